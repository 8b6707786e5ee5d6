"""Pictures of referring segmentation results (registered in mmseg's
VISUALIZERS)."""
from .refer_visualizer import (ReferSegVisualizer, draw_mask_overlay,
                               draw_refer_overlay, draw_refer_panels,
                               no_target_caption, text_band, wrap_text)

__all__ = [
    'ReferSegVisualizer', 'draw_mask_overlay', 'draw_refer_overlay',
    'draw_refer_panels', 'no_target_caption', 'text_band', 'wrap_text'
]
