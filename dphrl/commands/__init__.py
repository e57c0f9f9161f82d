"""The four commands, each a thin `run(cfg, run_dir)` over the library; none imports another."""
