"""Datasets: a synthetic COCO-format shapes dataset for demos and tests."""
from .synthetic_coco import CLASSES, PALETTE, generate_synthetic_coco

__all__ = ['CLASSES', 'PALETTE', 'generate_synthetic_coco']
