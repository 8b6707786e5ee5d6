from .refer_encoder_decoder import ReferringEncoderDecoder

__all__ = ['ReferringEncoderDecoder']
