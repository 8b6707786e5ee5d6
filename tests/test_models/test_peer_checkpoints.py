"""The authors' DETRIS / ETRIS checkpoints <-> mmseg_sera
(``mmseg_sera.models.peer_checkpoints`` and
``tools/model_converters/{detris,etris}_to_sera.py``).

No authors' code: each test writes a checkpoint in the authors' full-model
layout itself, from the key list below (their module names, read in their
code; :func:`detris_names` / :func:`etris_names`), with random values and
the shapes of our tiny models. The list is written independently of the
package's rules, so a wrong rule fails here. The file is what their
``train.py`` saves: the DDP wrapper's ``state_dict`` (keys under
``module.``) beside ``optimizer``, ``scheduler``, ``epoch`` ...
"""
import importlib.util
import os.path as osp

import pytest
import torch

from mmseg_sera.apis import inference, init_model
from mmseg_sera.models import peer_checkpoints as pc
from tests.conftest import run_test_tool, tiny_cfg_options

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DETRIS_CFG = osp.join(
    REPO, 'configs/detris/'
    'detris_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-112x112.py')
ETRIS_BASE = osp.join(REPO, 'configs/_base_/models/'
                      'etris_clip-vit-b16_clip-b16.py')
HYBRID_CFG = osp.join(
    REPO, 'configs/hybrid/'
    'detris-da_sera-fusion_dinov2-tiny_clip-tiny_1xb16-50e_synthetic-'
    '112x112.py')

BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
LIN = ('weight', 'bias')
MHA = ('in_proj_weight', 'in_proj_bias', 'out_proj.weight', 'out_proj.bias')


def _cli(peer):
    path = osp.join(REPO, 'tools', 'model_converters', f'{peer}_to_sera.py')
    spec = importlib.util.spec_from_file_location(f'_{peer}_cli', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return lambda argv: module.main(peer, module.__doc__, argv)


def _pairs(theirs, ours, names):
    return {f'{theirs}.{n}': f'{ours}.{n}' for n in names}


# --------------------------------------------------------------------------
# the authors' key names (their modules), paired with ours
# --------------------------------------------------------------------------
def adapter_names(theirs, ours, cross):
    """DETRIS ``DenseAligner`` (``cross``) / ``TextAdapter`` (model/
    adapter.py): D_fc1, D_fc2, dense_branch1 (BasicConv: conv, bn),
    dense_branch2/3 (Sequential of two BasicConvs), cross.{multihead_attn,
    image_proj, text_proj, back_proj}."""
    out = {}
    out.update(_pairs(f'{theirs}.D_fc1', f'{ours}.fc1', LIN))
    out.update(_pairs(f'{theirs}.D_fc2', f'{ours}.fc2', LIN))
    out.update(_pairs(f'{theirs}.dense_branch1.conv',
                      f'{ours}.dmoc.branches.0.0', LIN))
    out.update(_pairs(f'{theirs}.dense_branch1.bn',
                      f'{ours}.dmoc.branches.0.1', BN))
    for k in (2, 3):
        for c in (0, 1):
            out.update(_pairs(f'{theirs}.dense_branch{k}.{c}.conv',
                              f'{ours}.dmoc.branches.{k - 1}.{c}.0', LIN))
            out.update(_pairs(f'{theirs}.dense_branch{k}.{c}.bn',
                              f'{ours}.dmoc.branches.{k - 1}.{c}.1', BN))
    if cross:
        out.update(_pairs(f'{theirs}.cross.multihead_attn',
                          f'{ours}.cross_attn', MHA))
        for a, b in (('image_proj', 'img_proj'), ('text_proj', 'text_proj'),
                     ('back_proj', 'back_proj')):
            out.update(_pairs(f'{theirs}.cross.{a}', f'{ours}.{b}', LIN))
    return out


def cris_names(num_layers):
    """``Neck``/``HA``, ``Decoder``/``GA`` and ``Projector`` (model/
    layers.py of both repositories)."""
    out = _pairs('neck.txt_proj', 'neck.txt_proj', LIN)
    for i, lv in enumerate((3, 4, 5)):
        out.update(_pairs(f'neck.fusion{lv}.multihead_attn',
                          f'neck.gates.{i}.attn', MHA))
        out[f'neck.f{lv}_proj.0.weight'] = f'neck.projs.{i}.conv.weight'
        out.update(_pairs(f'neck.f{lv}_proj.1', f'neck.projs.{i}.bn', BN))
    cbrs = [('neck.aggr', 'neck.aggr'),
            ('neck.coordconv.0.conv1', 'neck.coord_convs.0'),
            ('neck.coordconv.1', 'neck.coord_convs.1'),
            ('proj.vis.1', 'decode_head.projector.up_convs.0'),
            ('proj.vis.3', 'decode_head.projector.up_convs.1')]
    for theirs, ours in cbrs:
        out[f'{theirs}.0.weight'] = f'{ours}.conv.weight'
        out.update(_pairs(f'{theirs}.1', f'{ours}.bn', BN))
    out.update(_pairs('proj.vis.4', 'decode_head.projector.visual_proj', LIN))
    out.update(_pairs('proj.txt', 'decode_head.projector.dynamic.fc', LIN))
    for n in range(num_layers):
        t, o = f'decoder.layers.{n}', f'decode_head.decoder.layers.{n}'
        for a, b in (('self_attn_norm', 'norm_sa'),
                     ('cross_attn_norm', 'norm_ca'), ('norm1', 'norm1'),
                     ('norm2', 'norm2'), ('norm3', 'norm3'),
                     ('ffn.0', 'ffn.0'), ('ffn.3', 'ffn.3'),
                     ('ffn.4', 'ffn.4')):
            out.update(_pairs(f'{t}.{a}', f'{o}.{b}', LIN))
        out.update(_pairs(f'{t}.self_attn', f'{o}.self_attn', MHA))
        out.update(_pairs(f'{t}.multihead_attn', f'{o}.cross_attn', MHA))
    out.update(_pairs('decoder.norm', 'decode_head.decoder.norm', LIN))
    return out


def tower_names(our_keys, ours, theirs, skip):
    """Frozen tower keys: the same names under another prefix."""
    return {theirs + k[len(ours):]: k
            for k in our_keys if k.startswith(ours) and not skip(k)}


def detris_names(our_keys, da_blocks, ta_layers, num_layers):
    """The DETRIS model's state dict keys -> ours. ``dinov2.*`` (official
    DINOv2 names, ``mask_token`` extra), ``txt_backbone.*`` (CLIP text
    names, ``logit_scale`` extra)."""
    out = tower_names(our_keys, 'backbone.', 'dinov2.',
                      lambda k: '.adapters.' in k or k.endswith(
                          'pos_resampling'))
    out.update(tower_names(our_keys, 'text_encoder.', 'txt_backbone.',
                           lambda k: '.adapters.' in k))
    for i in da_blocks:
        out.update(adapter_names(f'dinov2.blocks.{i}.adapter',
                                 f'backbone.adapters.parallel_mlp.{i}', True))
    for j in ta_layers:
        out.update(adapter_names(
            f'txt_backbone.transformer.resblocks.{j}.adapter',
            f'text_encoder.adapters.parallel_mlp_text.{j}', False))
    out.update(cris_names(num_layers))
    return out


def etris_names(our_keys, num_stages, num_layers):
    """The ETRIS model's keys -> ours: ``backbone.visual.*`` (CLIP image
    names), ``backbone.*`` (CLIP text names, ``logit_scale`` extra),
    ``bridger.*`` (``Bridger_ViT``: zoom_in, zoom_out, linear1, linear2,
    fusion_v, fusion_t, ln_v, ln_t)."""
    out = tower_names(our_keys, 'backbone.', 'backbone.visual.',
                      lambda k: '.adapters.' in k)
    out.update(tower_names(our_keys, 'text_encoder.', 'backbone.',
                           lambda k: '.adapters.' in k))
    b = 'backbone.adapters.bridge'
    for s in range(num_stages):
        for z in ('zoom_in', 'zoom_out'):
            out[f'bridger.{z}.{s}.0.weight'] = f'{b}.stages.{s}.{z}.0.weight'
            out.update(_pairs(f'bridger.{z}.{s}.1', f'{b}.stages.{s}.{z}.1',
                              BN))
        out.update(_pairs(f'bridger.linear1.{s}', f'{b}.stages.{s}.text_in',
                          LIN))
        out.update(_pairs(f'bridger.linear2.{s}', f'{b}.stages.{s}.text_out',
                          LIN))
        out.update(_pairs(f'bridger.fusion_v.{s}.multihead_attn',
                          f'{b}.stages.{s}.attn_v', MHA))
        out.update(_pairs(f'bridger.fusion_t.{s}.multihead_attn',
                          f'{b}.stages.{s}.attn_t', MHA))
        if s < num_stages - 1:
            out.update(_pairs(f'bridger.ln_v.{s}', f'{b}.norms_v.{s}', LIN))
            out.update(_pairs(f'bridger.ln_t.{s}', f'{b}.norms_t.{s}', LIN))
    out.update(cris_names(num_layers))
    return out


# --------------------------------------------------------------------------
# tiny models and the authors' files
# --------------------------------------------------------------------------
ETRIS_TINY = f"""
_base_ = [{ETRIS_BASE!r}]
model = dict(
    text_encoder=dict(text_cfg=dict(width=16, layers=6, heads=2),
                      embed_dim=12, context_length=10, pretrained=None),
    backbone=dict(
        vision_cfg=dict(width=32, layers=6, head_width=16, patch_size=16,
                        image_size=64),
        embed_dim=12, pretrained=None, pos_embed_size=4,
        out_indices=(1, 3, 5),
        adapters=[dict(type='ETRISBridger', insert=(1, 3, 5), text_dims=16,
                       hidden_dims=8, num_heads=2)]),
    neck=dict(in_channels=(32, 32, 12), channels=16, text_dims=12,
              num_heads=2),
    decode_head=dict(in_channels=16, channels=8, text_dims=16,
                     pooled_dims=12, num_decoder_layers=2, decoder_heads=2,
                     decoder_ffn_channels=16, up_channels=(16, 8)))
"""


def random_like(shapes, seed):
    """Random values: BN variances positive, counters integers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith('num_batches_tracked'):
            out[k] = torch.tensor(7)
        elif k.endswith('running_var'):
            out[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith('pos_resampling'):
            out[k] = torch.tensor([1000, 0])
        else:
            out[k] = 0.1 * torch.randn(shape, generator=g)
    return out


def save_authors_file(path, model_state):
    """What their train.py writes (DDP keys, optimizer, scheduler)."""
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([param], lr=1e-4)
    param.grad = torch.ones(2)
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[35, 55])
    torch.save(dict(epoch=65, cur_iou=0.71, best_iou=0.72,
                    prec={'Pr@50': 0.8},
                    state_dict={'module.' + k: v
                                for k, v in model_state.items()},
                    optimizer=opt.state_dict(),
                    scheduler=sched.state_dict()), path)


class Peer:
    """A tiny model of one peer, its key list and an authors' file."""

    def __init__(self, peer, config, tmp):
        self.peer, self.config = peer, config
        model = init_model(config)
        self.ours = random_like(
            {k: v.shape for k, v in model.state_dict().items()}, seed=1)
        if peer == 'detris':
            self.names = detris_names(self.ours, (1, 3), (1, ), 1)
            self.extras = {'dinov2.mask_token': torch.randn(1, 96),
                           'txt_backbone.logit_scale': torch.tensor(4.6)}
        else:
            self.names = etris_names(self.ours, 3, 2)
            self.extras = {'backbone.logit_scale': torch.tensor(4.6)}
        self.theirs = {t: self.ours[o] for t, o in self.names.items()}
        self.theirs.update(self.extras)
        self.src = str(tmp / f'{peer}_best_model.pth')
        save_authors_file(self.src, self.theirs)
        self.cli = _cli(peer)


@pytest.fixture(scope='module')
def detris(tmp_path_factory):
    return Peer('detris', DETRIS_CFG, tmp_path_factory.mktemp('detris'))


@pytest.fixture(scope='module')
def etris(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('etris')
    cfg = tmp / 'etris_tiny.py'
    cfg.write_text(ETRIS_TINY)
    return Peer('etris', str(cfg), tmp)


@pytest.fixture(params=['detris', 'etris'])
def peer(request):
    return request.getfixturevalue(request.param)


def logits(model, patch, seed=0):
    """The head's logits on a random non-square 2-sample batch of 4 x 6
    patches, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4 * patch, 6 * patch, generator=g)
    with torch.no_grad():
        text, _, neck = model.extract_feat(
            x, ['the man on the left', 'a red car'])
        return model.decode_head(neck.feats, text)


# --------------------------------------------------------------------------
# the map
# --------------------------------------------------------------------------
def test_key_list_covers_every_key(peer):
    """Every key of our model has an authors' name (bar DINOv2's
    resampling record), and the reverse map gives exactly those names."""
    ours_only = {'backbone.pos_resampling'} if peer.peer == 'detris' else set()
    assert set(peer.names.values()) == set(peer.ours) - ours_only
    back = pc.sera_to_peer(peer.ours, peer.peer, extras=peer.extras)
    assert set(back) == set(peer.theirs)
    for k, v in back.items():
        assert torch.equal(v, peer.theirs[k]), k


def test_forward_map_matches_the_key_list(peer):
    out = pc.peer_to_sera(peer.theirs, peer.peer)
    assert set(out) == set(peer.ours)
    for k, v in out.items():
        assert torch.equal(v, peer.ours[k]), k


def test_unwrap_accepts_their_file_with_or_without_wrappers(peer):
    """DDP keys under ``state_dict`` (train.py), plain keys, or a bare
    state dict: the same model state."""
    ddp = {'module.' + k: v for k, v in peer.theirs.items()}
    for ckpt in (dict(state_dict=ddp, epoch=1), dict(state_dict=peer.theirs),
                 dict(peer.theirs)):
        state = pc.unwrap_peer_checkpoint(ckpt, peer.peer)
        assert state.keys() == peer.theirs.keys()
    with pytest.raises(ValueError, match='not tensors'):
        pc.unwrap_peer_checkpoint(dict(state_dict=dict(ddp, x=1)), peer.peer)


def test_unknown_keys_are_listed(peer):
    bad = dict(peer.theirs, **{'neck.extra.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match=r"no place .*neck\.extra\.weight"):
        pc.peer_to_sera(bad, peer.peer)
    ours = dict(peer.ours, **{'decode_head.extra.bias': torch.zeros(1)})
    with pytest.raises(ValueError, match=r'decode_head\.extra\.bias'):
        pc.sera_to_peer(ours, peer.peer)


# --------------------------------------------------------------------------
# the command lines
# --------------------------------------------------------------------------
def convert(peer, tmp_path, *extra, src=None):
    dst = str(tmp_path / 'converted.pth')
    assert peer.cli([src or peer.src, dst, '--config', peer.config,
                     *extra]) == 0
    return dst


def test_converted_file_loads_strictly_and_gives_the_same_logits(
        peer, tmp_path):
    """authors' file -> CLI -> init_model(CONFIG, DST, strict=True): the
    same state and logits as the same weights written in our layout."""
    dst = convert(peer, tmp_path)
    model = init_model(peer.config, dst, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, peer.ours[k]), k
    ours_file = str(tmp_path / 'ours.pth')
    torch.save(dict(state_dict=peer.ours), ours_file)
    ref = init_model(peer.config, ours_file, strict=True)
    patch = 14 if peer.peer == 'detris' else 16
    out = logits(model, patch)
    assert out.shape == (2, 1, 16, 24)  # 4x the 4 x 6 patch grid
    torch.testing.assert_close(out, logits(ref, patch), rtol=0, atol=0)
    meta = torch.load(dst, weights_only=True)['meta']
    assert meta['peer'] == peer.peer and meta['epoch'] == 65
    assert set(meta['peer_extras']) == set(peer.extras)


def test_round_trips_are_exact(peer, tmp_path):
    """authors -> ours -> authors and ours -> authors -> ours, bit for
    bit (the extras travel in the converted file's meta)."""
    dst = convert(peer, tmp_path)
    back = str(tmp_path / 'back.pth')
    assert peer.cli([dst, back, '--reverse']) == 0
    written = torch.load(back, weights_only=True)
    assert set(written) == {'state_dict'}
    theirs = {k[len('module.'):]: v
              for k, v in written['state_dict'].items()}
    assert all(k.startswith('module.') for k in written['state_dict'])
    assert set(theirs) == set(peer.theirs)
    for k, v in theirs.items():
        assert torch.equal(v, peer.theirs[k]), k
    again = convert(peer, tmp_path, src=back)
    state = torch.load(again, weights_only=True)['state_dict']
    assert set(state) == set(peer.ours)
    for k, v in state.items():
        assert torch.equal(v, peer.ours[k]), k


def test_reverse_of_a_trained_model_without_extras(peer, tmp_path):
    """A model trained here has no extras: the authors' strict load still
    finds mask_token / logit_scale (unused values)."""
    ours_file = str(tmp_path / 'ours.pth')
    torch.save(dict(state_dict=peer.ours, meta=dict()), ours_file)
    back = str(tmp_path / 'back.pth')
    assert peer.cli([ours_file, back, '--reverse']) == 0
    theirs = torch.load(back, weights_only=True)['state_dict']
    assert {k[len('module.'):] for k in theirs} == set(peer.theirs)
    assert theirs['module.' + next(iter(peer.extras))].numel() > 0


def test_dry_run_prints_the_table_and_writes_nothing(peer, tmp_path, capsys):
    dst = tmp_path / 'none.pth'
    assert peer.cli([peer.src, str(dst), '--config', peer.config,
                     '--dry-run']) == 0
    printed = capsys.readouterr().out
    assert not dst.exists()
    for theirs, ours in list(peer.names.items())[::25]:
        assert f'{theirs} ' in printed and f'-> {ours}\n' in printed
    assert 'dropped' in printed


def expect_error(peer, argv, capsys, *patterns):
    with pytest.raises(SystemExit) as err:
        peer.cli(argv)
    assert err.value.code == 2
    message = capsys.readouterr().err
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_errors_other_peer_and_sera_checkpoints(detris, etris, tmp_path,
                                                capsys):
    expect_error(detris, [etris.src, str(tmp_path / 'x.pth'), '--config',
                          detris.config], capsys, 'not a DETRIS checkpoint',
                 'etris_to_sera.py')
    expect_error(etris, [detris.src, str(tmp_path / 'x.pth'), '--config',
                         etris.config], capsys, 'not an ETRIS checkpoint',
                 'detris_to_sera.py')
    ours_file = str(tmp_path / 'ours.pth')
    torch.save(dict(state_dict=detris.ours, meta={}), ours_file)
    expect_error(detris, [ours_file, str(tmp_path / 'x.pth'), '--config',
                          detris.config], capsys,
                 'already an mmseg_sera checkpoint')
    expect_error(detris, [detris.src, str(tmp_path / 'x.pth'), '--reverse'],
                 capsys, '--reverse reads an mmseg_sera checkpoint',
                 'a DETRIS model')
    etris_ours = str(tmp_path / 'etris_ours.pth')
    torch.save(dict(state_dict=etris.ours), etris_ours)
    expect_error(detris, [etris_ours, str(tmp_path / 'x.pth'), '--reverse'],
                 capsys, 'an mmseg_sera ETRIS model, not DETRIS',
                 'etris_to_sera.py --reverse')


def test_error_etris_resnet_variant(etris, tmp_path, capsys):
    theirs = {k: v for k, v in etris.theirs.items()
              if not k.startswith('backbone.visual.')}
    theirs['backbone.visual.layer1.0.conv1.weight'] = torch.zeros(1)
    theirs['backbone.visual.attnpool.c_proj.weight'] = torch.zeros(1)
    src = str(tmp_path / 'rn50.pth')
    save_authors_file(src, theirs)
    expect_error(etris, [src, str(tmp_path / 'x.pth'), '--config',
                         etris.config], capsys, 'CLIP ResNet',
                 'only the ViT variant converts')


def test_errors_unreadable_files(detris, tmp_path, capsys):
    data = open(detris.src, 'rb').read()
    cut = tmp_path / 'truncated.pth'
    cut.write_bytes(data[:len(data) // 2])
    expect_error(detris, [str(cut), str(tmp_path / 'x.pth')], capsys,
                 'truncated.pth', 'cannot read checkpoint')
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint\n')
    expect_error(detris, [str(text), str(tmp_path / 'x.pth')], capsys,
                 'cannot read checkpoint')
    expect_error(detris, [str(tmp_path / 'absent.pth'),
                          str(tmp_path / 'x.pth')], capsys,
                 'checkpoint not found')
    torch.save([1, 2], tmp_path / 'list.pth')
    expect_error(detris, [str(tmp_path / 'list.pth'),
                          str(tmp_path / 'x.pth')], capsys,
                 'holds a list, not a dict')


def test_errors_missing_and_unknown_keys(peer, tmp_path, capsys):
    theirs = dict(peer.theirs)
    del theirs['neck.aggr.0.weight']
    src = str(tmp_path / 'missing.pth')
    save_authors_file(src, theirs)
    expect_error(peer, [src, str(tmp_path / 'x.pth'), '--config',
                        peer.config], capsys, '1 missing',
                 'neck.aggr.conv.weight (theirs: neck.aggr.0.weight)')
    theirs = dict(peer.theirs, **{'neck.f6_proj.0.weight': torch.ones(1)})
    save_authors_file(src, theirs)
    expect_error(peer, [src, str(tmp_path / 'x.pth'), '--config',
                        peer.config], capsys, 'neck.f6_proj.0.weight',
                 'no place in the')


def test_error_config_of_another_size(detris, tmp_path, capsys):
    """A checkpoint of another width than the config (as DETRIS-L against
    a DETRIS-B config) is named as such."""
    cfg = tmp_path / 'wider.py'
    cfg.write_text(f"_base_ = [{DETRIS_CFG!r}]\nmodel = dict(backbone=dict("
                   "adapters=[dict(type='DETRISDenseAligner', insert=(1, 3),"
                   " scale=0.2, hidden_dims=16, attn_dims=32, num_heads=2,"
                   " text_dims=64)]))\n")
    expect_error(detris, [detris.src, str(tmp_path / 'x.pth'), '--config',
                          str(cfg)], capsys, 'of another shape',
                 'another model size', '--backbone large')
    expect_error(detris, [detris.src, str(tmp_path / 'x.pth'), '--config',
                          str(cfg), '--backbone', 'large'], capsys,
                 'give --backbone or --config, not both')


def frozen_tower_files(peer, tmp_path):
    """The authors' file without its frozen towers, a DINOv2 file in the
    official layout and an open_clip CLIP state dict with the same
    weights."""
    if peer.peer == 'detris':  # the towers hold only adapters trained
        theirs = {t: v for t, v in peer.theirs.items()
                  if not t.startswith(('dinov2.', 'txt_backbone.'))
                  or '.adapter.' in t}
    else:  # ETRIS trains both CLIP position tables
        theirs = {t: v for t, v in peer.theirs.items()
                  if not t.startswith('backbone.') or t in (
                      'backbone.positional_embedding',
                      'backbone.visual.positional_embedding')}
    src = str(tmp_path / 'no_towers.pth')
    save_authors_file(src, theirs)
    clip = {k[len('text_encoder.'):]: v for k, v in peer.ours.items()
            if k.startswith('text_encoder.') and '.adapters.' not in k}
    files = ['--clip', str(tmp_path / 'clip.bin')]
    if peer.peer == 'etris':
        clip.update({'visual.' + k[len('backbone.'):]: v
                     for k, v in peer.ours.items()
                     if k.startswith('backbone.') and '.adapters.' not in k})
        clip['visual.positional_embedding'] = torch.zeros(17, 32)
    else:
        dino = {k[len('backbone.'):]: v for k, v in peer.ours.items()
                if k.startswith('backbone.') and '.adapters.' not in k
                and not k.endswith('pos_resampling')}
        dino['mask_token'] = torch.zeros(1, 96)
        torch.save(dino, tmp_path / 'dinov2.pth')
        files += ['--dinov2', str(tmp_path / 'dinov2.pth')]
    torch.save(clip, tmp_path / 'clip.bin')
    return src, files


def test_towers_from_their_own_checkpoints(peer, tmp_path, capsys):
    """A file saved without the frozen towers converts with --dinov2 /
    --clip to the same state (ETRIS's trained position tables still come
    from the file, not from CLIP)."""
    src, files = frozen_tower_files(peer, tmp_path)
    expect_error(peer, [src, str(tmp_path / 'x.pth'), '--config',
                        peer.config], capsys, 'missing',
                 'frozen tower tensors are among them')
    dst = convert(peer, tmp_path, *files, src=src)
    assert 'frozen tower tensors taken from' in capsys.readouterr().out
    state = torch.load(dst, weights_only=True)['state_dict']
    assert set(state) == set(peer.ours)
    for k, v in state.items():
        assert torch.equal(v, peer.ours[k]), k
    # without --dinov2 / --clip: the tower files the config names
    named = dict(zip(files[::2], files[1::2]))
    if peer.peer == 'detris':
        model = (f"dict(text_encoder=dict(pretrained={named['--clip']!r}), "
                 "backbone=dict(init_cfg=dict(_delete_=True, "
                 f"type='Pretrained', checkpoint={named['--dinov2']!r})))")
    else:
        model = (f"dict(text_encoder=dict(pretrained={named['--clip']!r}), "
                 f"backbone=dict(pretrained={named['--clip']!r}))")
    cfg = tmp_path / 'with_towers.py'
    cfg.write_text(f'_base_ = [{peer.config!r}]\nmodel = {model}\n')
    dst = str(tmp_path / 'from_config.pth')
    assert peer.cli([src, dst, '--config', str(cfg)]) == 0
    state = torch.load(dst, weights_only=True)['state_dict']
    for k, v in peer.ours.items():
        assert torch.equal(v, state[k]), k


def test_etris_position_tables_never_come_from_clip(etris, tmp_path,
                                                    capsys):
    src, files = frozen_tower_files(etris, tmp_path)
    theirs = {k[len('module.'):]: v for k, v in torch.load(
        src, weights_only=True)['state_dict'].items()}
    del theirs['backbone.visual.positional_embedding']
    save_authors_file(src, theirs)
    expect_error(etris, [src, str(tmp_path / 'x.pth'), '--config',
                         etris.config, *files], capsys, '1 missing',
                 'backbone.positional_embedding (theirs: '
                 'backbone.visual.positional_embedding)')


def test_error_tower_of_another_size(detris, tmp_path, capsys):
    src, files = frozen_tower_files(detris, tmp_path)
    dino = torch.load(tmp_path / 'dinov2.pth', weights_only=True)
    wide = {k: torch.zeros(*[2 * n if n in (96, 192) else n
                             for n in v.shape]) for k, v in dino.items()}
    torch.save(wide, tmp_path / 'dinov2.pth')
    expect_error(detris, [src, str(tmp_path / 'x.pth'), '--config',
                          detris.config, *files], capsys,
                 'dinov2.pth', 'tower of another size')
    expect_error(detris, [detris.src, str(tmp_path / 'x.pth'), '--config',
                          detris.config, '--dinov2', detris.src], capsys,
                 'not a DINOv2 state dict')


def test_partial_load_into_a_hybrid_config(detris, tmp_path, capfd,
                                           monkeypatch):
    """The converted DETRIS file initialises the DETRIS-DA + SERA-Fusion
    hybrid: towers and Dense Aligners loaded, the rest kept and logged."""
    dst = convert(detris, tmp_path)
    capfd.readouterr()
    logged = []
    monkeypatch.setattr(inference, 'print_log',
                        lambda msg, **kw: logged.append(msg))
    model = init_model(HYBRID_CFG, dst)
    state = model.state_dict()
    shared = {k for k in state if k in detris.ours}
    assert {k for k in shared if '.adapters.parallel_mlp.' in k} == {
        k for k in detris.ours if '.adapters.parallel_mlp.' in k}
    for k in shared:
        assert torch.equal(state[k], detris.ours[k]), k
    own = [k for k in state if k not in detris.ours]
    assert own and all(k.startswith(('neck.', 'decode_head.')) for k in own)
    captured = capfd.readouterr()
    log = captured.out + captured.err
    assert 'missing keys in source state_dict' in log
    assert 'unexpected key in source state_dict' in log
    assert 'text_encoder.adapters.parallel_mlp_text.1.fc1.weight' in log
    n = len(shared)
    summary, = logged
    assert f"loaded {n} of the model's {len(state)} tensors" in summary
    kept, unused = summary.split('; not in the checkpoint')[1].split(
        '; in the checkpoint, not used: ')
    assert 'neck.' in kept and 'decode_head.' in kept
    assert 'backbone' not in kept and 'text_encoder' not in kept
    n_ta = sum('.parallel_mlp_text.' in k for k in detris.ours)
    assert f'text_encoder.adapters.parallel_mlp_text: {n_ta}' in unused


def test_tools_test_evaluates_a_converted_checkpoint(detris, synthetic_root,
                                                     tmp_path):
    """tools/test.py takes the converted file (its metrics are
    percentages; that the weights equal ours is checked above)."""
    dst = convert(detris, tmp_path)
    options = tiny_cfg_options(synthetic_root, **{
        'test_dataloader.dataset.indices': 4,
        'test_dataloader.batch_size': 4})
    run_test_tool(detris.config, dst, tmp_path / 'eval', options)
