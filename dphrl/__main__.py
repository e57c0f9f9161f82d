from dphrl.cli import main

main()
