"""Data: ImageNet folders -> WebDataset shards (make_shards), the demo dataset (demo), the loading
pipeline per data-parallel group (loader) and the paper's augmentations (augment)."""
