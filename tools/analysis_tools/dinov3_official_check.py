"""Features of our DINOv3 against the official DINOv3 module (one-off).

    python tools/analysis_tools/dinov3_official_check.py --official-src DIR

DIR holds the ``dinov3`` package of facebookresearch/dinov3 (checked at
6876159a), e.g. ``git archive 6876159a dinov3 | tar x -C DIR`` on a clone;
it is imported from there and never enters this repository. For each case
the official hub builder (``pretrained=False``) gets seeded random weights
(LayerNorm weights 1 + 0.2 N(0, 1), LayerScale 0.3 N(0, 1), the rest
0.05 N(0, 1), RoPE periods rounded to bfloat16 as the releases store
them, the qkv bias mask 1/0/1 or zeros); its ``state_dict()`` is saved,
converted with ``tools/model_converters/dinov3_to_sera.py SRC DST --arch``
and loaded into ``DINOv3`` through ``init_cfg``; both run in eval mode on
non-square inputs (one not divisible by 16) and the normed patch features
after blocks 3 and 11 are compared (official:
``get_intermediate_layers(x, n=[3, 11], reshape=True, norm=True)``).
Also prints the official-vs-timm gap on the same weights (timm loaded with
its own ``checkpoint_filter_fn``) and the 7B parameter counts (meta device).
"""
import argparse
import os
import os.path as osp
import subprocess
import sys
import tempfile

import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CASES = [('vits16', 'small', 'q_v'), ('vits16', 'small', 'zeros'),
         ('vitb16', 'base', 'q_v'), ('vits16plus', 'small_plus', 'q_v')]
TAKE = [3, 11]
SIZES = ((224, 320), (200, 330))


def randomize(m, seed: int, mask: str) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if 'norm' in n and n.endswith('weight'):
                p.copy_(1 + 0.2 * r)
            elif n.endswith('gamma'):
                p.copy_(0.3 * r)
            else:
                p.copy_(0.05 * r)
        m.rope_embed.periods.copy_(
            m.rope_embed.periods.to(torch.bfloat16).float())
        if mask == 'zeros':
            for blk in m.blocks:
                blk.attn.qkv.bias_mask.zero_()


def _max_diff(a, b) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--official-src', required=True,
                        help='folder holding the official dinov3 package')
    args = parser.parse_args(argv)
    if not osp.isfile(osp.join(args.official_src, 'dinov3', 'hub',
                               'backbones.py')):
        parser.error(f'{args.official_src} has no dinov3/hub/backbones.py '
                     '(extract the dinov3 package of facebookresearch/'
                     'dinov3 there)')
    sys.path.insert(0, args.official_src)
    from dinov3.hub import backbones as hub

    from mmseg_sera.models.backbones import DINOv3
    tmp = tempfile.mkdtemp()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
               os.environ.get('PYTHONPATH', ''))
    for builder, arch, mask in CASES:
        ref = getattr(hub, f'dinov3_{builder}')(pretrained=False).eval()
        randomize(ref, 0, mask)
        src = osp.join(tmp, f'{builder}_{mask}.pth')
        dst = osp.join(tmp, f'{builder}_{mask}_sera.pth')
        torch.save(ref.state_dict(), src)
        subprocess.run([
            sys.executable,
            osp.join(ROOT, 'tools/model_converters/dinov3_to_sera.py'), src,
            dst, '--arch', arch
        ], check=True, capture_output=True, env=env)
        ours = DINOv3(arch=arch, out_indices=TAKE, out_norm='all',
                      init_cfg=dict(type='Pretrained', checkpoint=dst))
        ours.init_weights()
        ours.eval()
        for hw in SIZES:
            x = torch.randn(1, 3, *hw,
                            generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                a = ref.get_intermediate_layers(x, n=TAKE, reshape=True,
                                                norm=True)
                b = ours(x)
            print(f'{builder} ({arch}, bias mask {mask}) input {hw}: grid '
                  f'{tuple(b[0].shape[-2:])}, max |official - ours| = '
                  f'{_max_diff(a, b):.2e} (feature std '
                  f'{a[-1].std().item():.2f})')

    import timm
    from timm.models.eva import checkpoint_filter_fn
    ref = hub.dinov3_vits16(pretrained=False).eval()
    randomize(ref, 0, 'q_v')
    tm = timm.create_model('vit_small_patch16_dinov3_qkvb', pretrained=False,
                           num_classes=0).eval()
    tm.load_state_dict(checkpoint_filter_fn(ref.state_dict(), tm))
    x = torch.randn(1, 3, *SIZES[0],
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ref.get_intermediate_layers(x, n=TAKE, reshape=True, norm=True)
        b = tm.forward_intermediates(x, indices=TAKE, norm=True,
                                     output_fmt='NCHW',
                                     intermediates_only=True)
    print(f'official vs timm {timm.__version__} on the same vits16 weights '
          f'(bf16-rounded stored periods), input {SIZES[0]}: max diff '
          f'{_max_diff(a, b):.2e}')

    with torch.device('meta'):
        big = hub.dinov3_vit7b16(pretrained=False)
        ours = DINOv3(arch='7b')
    n_ref = sum(p.numel() for k, p in big.named_parameters()
                if k != 'mask_token' and 'local_cls_norm' not in k)
    n_ours = sum(p.numel() for p in ours.parameters())
    print(f'7B parameters: official {n_ref} (without mask_token, '
          f'local_cls_norm), ours {n_ours}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
