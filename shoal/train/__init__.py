"""Training: the papers' models, trained with progress, checkpoints and plots, exported to the model
repository. Importing this package does not import torch; its modules that train do."""
