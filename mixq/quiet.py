"""Targeted filters for third-party notices that say nothing about mixq or the user's model.

transformers logs, once per class, that `CLIPImageProcessor` / `SiglipImageProcessor` "require
torchvision" and fall back to the PIL implementation; diffusers touches those classes when its
pipelines are imported, so every mixq command printed two such lines. Image processors are never
used on mixq's paths (SD/SDXL pipelines encode text only), so exactly these records are dropped;
every other transformers message still shows.
"""

from __future__ import annotations

import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"
TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"


class _DropMatching(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def silence_torchvision_fallback_notice():
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    if not any(isinstance(f, _DropMatching) and f.fragment == TORCHVISION_FALLBACK for f in logger.filters):
        logger.addFilter(_DropMatching(TORCHVISION_FALLBACK))
