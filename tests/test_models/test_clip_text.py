"""OpenCLIPTextEncoder against open_clip's own CLIP model and tokenizer.

The checkpoints are tiny open_clip CLIP models written by the tests (random
weights, every parameter perturbed so LayerNorms and biases matter).
"""
import socket
import time
import warnings

import open_clip
import pytest
import torch
import torch.nn as nn

from mmseg_sera.models.structures import TextFeatures
from mmseg_sera.models.text_encoders.clip_text import (OpenCLIPTextEncoder,
                                                       extract_text_state_dict)

WIDTH, LAYERS, HEADS, EMBED = 64, 2, 2, 32
TINY_TEXT = dict(width=WIDTH, layers=LAYERS, heads=HEADS)
SENTENCES = [
    'the man in the red shirt on the left',
    'a dog',
    'second zebra from the right, the one eating grass!',
]
EOT = 49407
SOT = 49406


def _tiny_clip(layers: int = LAYERS) -> nn.Module:
    """A tiny open_clip CLIP (text tower like ViT-B-16's, but small)."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=EMBED,
        vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16,
                        head_width=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=WIDTH,
                      heads=HEADS, layers=layers))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope='module')
def tiny_clip():
    return _tiny_clip()


@pytest.fixture(scope='module')
def ckpt(tiny_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp('clip') / 'open_clip_tiny.bin'
    torch.save(tiny_clip.state_dict(), path)
    return path


def _encoder(**kwargs) -> OpenCLIPTextEncoder:
    kwargs.setdefault('text_cfg', TINY_TEXT)
    kwargs.setdefault('embed_dim', EMBED)
    return OpenCLIPTextEncoder(**kwargs)


@pytest.mark.parametrize('layout', ['full', 'wrapped', 'text_only'])
def test_matches_open_clip_encode_text_at_77(tiny_clip, ckpt, tmp_path,
                                             layout):
    state = tiny_clip.state_dict()
    if layout == 'wrapped':
        path = tmp_path / 'wrapped.pth'
        torch.save({'state_dict': state, 'meta': {}}, path)
    elif layout == 'text_only':
        path = tmp_path / 'text.pth'
        torch.save({k: v for k, v in state.items()
                    if not k.startswith('visual.') and k != 'logit_scale'},
                   path)
    else:
        path = ckpt
    enc = _encoder(pretrained=str(path), context_length=77)
    enc.init_weights()
    ids = open_clip.get_tokenizer('ViT-B-16')(SENTENCES)
    with torch.no_grad():
        ref = tiny_clip.encode_text(ids, normalize=False)
    out = enc(SENTENCES)
    assert isinstance(out, TextFeatures)
    assert out.tokens.shape == (3, 77, WIDTH)
    assert out.pooled.shape == (3, EMBED)
    assert (out.pooled - ref).abs().max() <= 1e-5
    # tokens are the ln_final output (pooled = tokens[eot] @ projection)
    eot = ids.argmax(-1)
    torch.testing.assert_close(
        out.tokens[torch.arange(3), eot] @ tiny_clip.text_projection, ref,
        atol=1e-5, rtol=0)


def test_sliced_context_matches_first_rows_of_positional_table(
        tiny_clip, ckpt):
    length = 12
    enc = _encoder(pretrained=str(ckpt), context_length=length)
    enc.init_weights()
    # the pretrained 77-row table is kept and sliced, not retrained
    assert enc.positional_embedding.shape == (77, WIDTH)
    texts = SENTENCES[:2]  # both fit in 12 tokens
    ids = open_clip.get_tokenizer('ViT-B-16')(texts, context_length=length)
    ref_model = _tiny_clip()
    ref_model.load_state_dict(tiny_clip.state_dict())
    ref_model.positional_embedding = nn.Parameter(
        tiny_clip.positional_embedding[:length].clone())
    ref_model.attn_mask = tiny_clip.attn_mask[:length, :length]
    with torch.no_grad():
        ref = ref_model.encode_text(ids, normalize=False)
    out = enc(texts)
    assert out.tokens.shape == (2, length, WIDTH)
    assert (out.pooled - ref).abs().max() <= 1e-5
    # causality: the first L token features equal those of the 77 run
    enc77 = _encoder(pretrained=str(ckpt), context_length=77)
    enc77.init_weights()
    out77 = enc77(texts)
    assert (out.tokens - out77.tokens[:, :length]).abs().max() <= 1e-5
    assert (out.pooled - out77.pooled).abs().max() <= 1e-5


@pytest.mark.parametrize('length', [5, 20, 77])
def test_token_ids_equal_open_clip_tokenizer(length):
    enc = _encoder(context_length=length, max_words_warning=False)
    ids = enc.tokenize(SENTENCES)
    ref = open_clip.get_tokenizer('ViT-B-16')(SENTENCES,
                                              context_length=length)
    assert ids.dtype == torch.long and ids.shape == (3, length)
    assert torch.equal(ids, ref)


def test_padding_mask_and_layout():
    enc = _encoder(context_length=20)
    ids = enc.tokenize(['a dog', 'the man in the red shirt'])
    n_words = [2, 6]
    for row, n in zip(ids, n_words):
        assert row[0] == SOT and row[n + 1] == EOT
        assert (row[n + 2:] == 0).all() and (row[:n + 2] != 0).all()
    out = enc(['a dog', 'the man in the red shirt'])
    expected = torch.zeros(2, 20, dtype=torch.bool)
    expected[0, 4:] = True
    expected[1, 8:] = True
    assert out.mask.dtype == torch.bool
    assert torch.equal(out.mask, expected)


def test_overlong_sentence_warns_once_and_keeps_eot():
    enc = _encoder(context_length=8)
    long_text = 'the tall man in the blue coat standing next to the car'
    other = 'one two three four five six seven eight nine'
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('default')
        for _ in range(3):
            ids = enc.tokenize([long_text, 'a cat'])
        enc.tokenize([other])
    msgs = [str(w.message) for w in rec
            if issubclass(w.category, UserWarning)]
    assert len(msgs) == 2
    assert long_text in msgs[0] and other in msgs[1]
    assert ids[0, -1] == EOT and ids[0, 0] == SOT and (ids[0] != 0).all()
    assert torch.equal(
        ids, open_clip.get_tokenizer('ViT-B-16')([long_text, 'a cat'],
                                                 context_length=8))
    # the switch turns the warning off
    quiet = _encoder(context_length=8, max_words_warning=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        quiet.tokenize([long_text])
    assert not [w for w in rec if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize('bad', ['', '   '])
def test_empty_sentence_raises(bad):
    enc = _encoder()
    with pytest.raises(ValueError, match='empty'):
        enc(['a dog', bad])


def test_non_string_raises():
    with pytest.raises(TypeError, match='sentence 1'):
        _encoder().tokenize(['a dog', 3])


def test_frozen_default_no_grad_and_eval():
    enc = _encoder()
    assert enc.trainable == 'frozen'
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training
    assert not any(m.training for m in enc.modules())
    out = enc(SENTENCES)
    for t in (out.tokens, out.pooled):
        assert not t.requires_grad and t.grad_fn is None


def test_ln_bias_trains_only_layernorms_and_biases():
    enc = _encoder(trainable='ln_bias')
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    ln_params = {
        f'{mn}.{pn}'
        for mn, m in enc.named_modules() if isinstance(m, nn.LayerNorm)
        for pn, _ in m.named_parameters(recurse=False)
    }
    biases = {n for n, _ in enc.named_parameters() if n.endswith('bias')}
    assert trainable == ln_params | biases
    assert 'ln_final.weight' in trainable
    assert 'transformer.resblocks.0.ln_1.weight' in trainable
    assert 'transformer.resblocks.1.mlp.c_fc.bias' in trainable
    for frozen in ('token_embedding.weight', 'positional_embedding',
                   'text_projection',
                   'transformer.resblocks.0.attn.in_proj_weight',
                   'transformer.resblocks.0.mlp.c_fc.weight'):
        assert frozen not in trainable
    enc.train()
    assert enc.training
    out = enc(SENTENCES[:2])
    assert out.pooled.requires_grad
    out.pooled.sum().backward()
    assert enc.ln_final.weight.grad is not None
    assert enc.token_embedding.weight.grad is None


def test_full_trains_everything():
    enc = _encoder(trainable='full')
    assert all(p.requires_grad for p in enc.parameters())


def test_missing_pretrained_raises_file_not_found(tmp_path):
    path = tmp_path / 'checkpoints' / 'open_clip_vit_b16.bin'
    enc = _encoder(pretrained=str(path))  # the constructor reads nothing
    with pytest.raises(FileNotFoundError, match='open_clip_vit_b16.bin'):
        enc.init_weights()


def test_checkpoint_missing_keys_raise(tmp_path):
    path = tmp_path / 'one_layer.pth'
    torch.save(_tiny_clip(layers=1).state_dict(), path)
    enc = _encoder(pretrained=str(path))
    with pytest.raises(ValueError, match='resblocks.1'):
        enc.init_weights()


def test_extract_text_state_dict_is_pure(tiny_clip):
    state = tiny_clip.state_dict()
    text = extract_text_state_dict({'state_dict': {
        'module.' + k: v for k, v in state.items()}})
    assert not any(k.startswith('visual.') for k in text)
    assert 'logit_scale' not in text
    assert text['positional_embedding'] is state['positional_embedding']
    assert set(text) == set(_encoder().state_dict())
    # a whole segmentor checkpoint: only text_encoder.* is taken
    seg = {'text_encoder.' + k: v for k, v in text.items()}
    seg['backbone.blocks.0.attn.qkv.weight'] = torch.zeros(1)
    assert extract_text_state_dict({'state_dict': seg}).keys() == text.keys()
    with pytest.raises(ValueError, match='no CLIP text-tower keys'):
        extract_text_state_dict({'foo': torch.zeros(1)})


def test_bad_arguments():
    with pytest.raises(ValueError, match='context_length'):
        _encoder(context_length=78)
    with pytest.raises(ValueError, match='trainable'):
        _encoder(trainable='partial')
    with pytest.raises(ValueError, match='hub'):
        _encoder(model_name='hf-hub:timm/ViT-B-16-SigLIP')
    with pytest.raises(ValueError, match='unknown open_clip model'):
        _encoder(model_name='ViT-Z-99')


def test_works_offline(monkeypatch):
    """Building, tokenising and encoding never open a network socket."""

    def refuse(*args, **kwargs):
        raise AssertionError('network access attempted')

    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    enc = _encoder(context_length=10)
    out = enc(['a dog'])
    assert out.pooled.shape == (1, EMBED)
    assert torch.equal(
        enc.tokenize(['a dog']),
        open_clip.get_tokenizer('ViT-B-16')(['a dog'], context_length=10))


def test_block_loop_is_reachable(ckpt):
    """embed -> blocks -> finalize reproduces forward (the hook a
    lock-step bridge uses)."""
    enc = _encoder(pretrained=str(ckpt), context_length=16)
    enc.init_weights()
    ids = enc.tokenize(SENTENCES)
    x = enc.embed(ids)
    assert len(enc.blocks) == LAYERS
    for block in enc.blocks:
        x = block(x, attn_mask=enc.attn_mask)
    manual = enc.finalize(x, ids)
    out = enc(SENTENCES)
    torch.testing.assert_close(manual.pooled, out.pooled)
    torch.testing.assert_close(manual.tokens, out.tokens)


def test_registry_build():
    from mmseg.registry import MODELS
    import mmseg_sera.models.text_encoders  # noqa: F401  (registers)
    enc = MODELS.build(
        dict(type='OpenCLIPTextEncoder', text_cfg=TINY_TEXT, embed_dim=EMBED,
             context_length=17))
    assert isinstance(enc, OpenCLIPTextEncoder)
    assert enc.embed_dims == WIDTH and enc.pooled_dims == EMBED


def test_real_vit_b16_tower_widths():
    start = time.perf_counter()
    # random init, no download
    enc = OpenCLIPTextEncoder(model_name='ViT-B-16')
    elapsed = time.perf_counter() - start
    assert enc.embed_dims == 512 and enc.pooled_dims == 512
    assert len(enc.blocks) == 12
    assert enc.positional_embedding.shape == (77, 512)
    assert enc.text_projection.shape == (512, 512)
    assert enc.context_length == 20 and enc.attn_mask.shape == (20, 20)
    assert elapsed < 5.0


def test_token_ids_follow_parameter_device():
    """Ids are moved to the parameters' device (meta stands in for a GPU)."""
    enc = _encoder(context_length=10).to('meta')
    out = enc(['a dog', 'a cat on the mat'])
    for t in (out.tokens, out.mask, out.pooled):
        assert t.device.type == 'meta'
    assert out.pooled.shape == (2, EMBED)


def test_quick_gelu_follows_named_config():
    assert isinstance(_encoder().blocks[0].mlp.gelu, nn.GELU)
    quick = _encoder(model_name='ViT-B-16-quickgelu')
    assert isinstance(quick.blocks[0].mlp.gelu, open_clip.model.QuickGELU)
    forced = _encoder(quick_gelu=True)
    assert isinstance(forced.blocks[0].mlp.gelu, open_clip.model.QuickGELU)
