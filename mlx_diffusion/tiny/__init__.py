"""The built-in model's own code: the synthetic scenes it is trained on (`synthetic`), its training (`train`) and its
evaluation (`evaluate`). Generation never imports this package: the built-in model is an ordinary model folder
(`assets/models/tiny`), run by the SD3 pipeline. Its training history is in README.md beside this file."""
