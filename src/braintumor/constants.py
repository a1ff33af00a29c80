"""Fixed facts every module agrees on: class order and the preprocessing the weights expect.

The class order is stored with every checkpoint too, so a model trained with a different order
still maps its outputs to the right names; these are only the defaults for new models.
"""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")

# Folder names seen in the Kaggle set and its ancestors, lower-cased, mapped to canonical names.
CLASS_ALIASES: dict[str, str] = {
    "glioma": "glioma",
    "glioma_tumor": "glioma",
    "glioma tumor": "glioma",
    "meningioma": "meningioma",
    "meningioma_tumor": "meningioma",
    "meningioma tumor": "meningioma",
    "notumor": "notumor",
    "no_tumor": "notumor",
    "no tumor": "notumor",
    "no-tumor": "notumor",
    "pituitary": "pituitary",
    "pituitary_tumor": "pituitary",
    "pituitary tumor": "pituitary",
}

IMAGE_SIZE: int = 224
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
)

# Entries that file managers and notebooks leave in data folders; never data, never an error.
JUNK_NAMES: frozenset[str] = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints", "__MACOSX"})

# A cap on the pixels of one decoded image or slice (4096 x 4096; clinical MRI is at most 1024 x 1024):
# larger files are refused before decoding, as possible decompression bombs.
MAX_IMAGE_PIXELS: int = 4096 * 4096
