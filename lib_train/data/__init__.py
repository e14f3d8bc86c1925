"""The dataset pipeline: folder scan -> buckets -> epoch plan -> pixels -> cached latents.

* ``images``: open / probe one image file (orientation, modes, damaged files).
* ``dataset``: scan the train and reg folders (``N_name`` repeats, captions, all problems at once).
* ``buckets``: aspect-ratio buckets and each image's resize/crop plan.
* ``captions``: caption shuffle / keep-tokens / dropout.
* ``batches``: deterministic per-epoch batch plans and the step formula.
* ``latent_cache``: pixel loading and the VAE latent cache (imports torch; import it explicitly).

Importing this package does not import torch, so the WebUI tab can scan a folder cheaply.
"""

from __future__ import annotations

from .batches import PlanEntry, Sample, batches_per_epoch, make_entries, plan_epoch, step_formula, total_steps
from .buckets import BucketPlan, assign_bucket, bucket_info, make_buckets
from .captions import process_caption, split_tags
from .dataset import DatasetScan, ImageItem, Subset, read_caption, scan_dataset
from .images import IMAGE_EXTENSIONS, open_training_image, probe_image

__all__ = [
    "IMAGE_EXTENSIONS", "BucketPlan", "DatasetScan", "ImageItem", "PlanEntry", "Sample", "Subset",
    "assign_bucket", "batches_per_epoch", "bucket_info", "make_buckets", "make_entries", "open_training_image",
    "plan_epoch", "probe_image", "process_caption", "read_caption", "scan_dataset", "split_tags", "step_formula",
    "total_steps",
]
