"""The guided tour's tools over the public API: the prompt bank (`prompts`), comparison grids of models x prompts x
seeds (`compare`). Generation never imports this package; the commands are in `cli/`."""
