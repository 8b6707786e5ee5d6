from .clip_text import OpenCLIPTextEncoder, extract_text_state_dict

__all__ = ['OpenCLIPTextEncoder', 'extract_text_state_dict']
