"""The commands: four thin `run(cfg, run_dir)` Hydra entry points over the library, and
`report`'s `run(folders, out, metrics)`, which composes no config; none imports another."""
