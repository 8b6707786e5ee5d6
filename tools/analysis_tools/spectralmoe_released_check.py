"""Our SpectralMoEAdapter slots against the released DepthMoE (one-off).

    python tools/analysis_tools/spectralmoe_released_check.py \
        --released-file DIR/SpectralMoE/models/backbones/depthmoe.py

The file is the released module of daxichen/SpectralMoE-main (checked at
6c6a5e74); it is imported from there (it needs mmseg and einops) and never
enters this repository. A DepthMoE with the release's options (laplace
gating, top-1, noisy gating, 6 experts of rank 16, 100 tokens, D = 1024,
here over 3 layers) gets seeded random weights (gates and noise N(0, 1),
expert factors N(0, 1) and 0.3 N(0, 1), W_tf and W_df 0.05 N(0, 1), scale
0.5); its state dict goes through
``tools/model_converters/spectralmoe_to_sera.py`` onto the
SpectralMoEAdapter slots (``released_compat=True``) of a DINOv3-L-wide
tower, and both run in eval mode on the same image tokens (with the 5
DINOv3 prefix tokens) and depth tokens (with a class token): the patch
tokens after each layer and the balance loss are compared.
"""
import argparse
import importlib.util
import os
import os.path as osp
import subprocess
import sys
import tempfile

import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
D, L, E, T, R = 1024, 3, 6, 100, 16


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--released-file', required=True,
                        help='the released depthmoe.py')
    args = parser.parse_args(argv)
    if not osp.isfile(args.released_file):
        parser.error(f'{args.released_file} not found (the released '
                     'SpectralMoE/models/backbones/depthmoe.py)')
    spec = importlib.util.spec_from_file_location('_released_depthmoe',
                                                  args.released_file)
    released = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(released)

    from mmseg_sera.models.backbones import DINOv3
    torch.manual_seed(0)
    ref = released.DepthMoE(num_layers=L, embed_dims=D, patch_size=16,
                            num_experts=E, lora_dims=[R] * E, top_k=1,
                            token_length=T, gating='laplace',
                            noisy_gating=True).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if n.startswith(('w_gate', 'w_noise', 'experts_a')):
                p.copy_(r)
            elif n.startswith('experts_b'):
                p.copy_(0.3 * r)
            elif n == 'scale':
                p.fill_(0.5)
            else:
                p.copy_(0.05 * r)
    tmp = tempfile.mkdtemp()
    src, dst = osp.join(tmp, 'released.pth'), osp.join(tmp, 'ours.pth')
    torch.save({'state_dict': {'backbone.depthmoe.' + k: v
                               for k, v in ref.state_dict().items()}}, src)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep +
               os.environ.get('PYTHONPATH', ''))
    subprocess.run([
        sys.executable,
        osp.join(ROOT, 'tools/model_converters/spectralmoe_to_sera.py'), src,
        dst
    ], check=True, capture_output=True, env=env)
    saved = torch.load(dst, weights_only=True)
    cfg = dict(saved['meta']['adapter_cfg'])
    cfg.pop('embed_dims')
    tower = DINOv3(arch=dict(embed_dims=D, num_layers=L, num_heads=16),
                   out_indices=(L - 1, ),
                   adapters=[dict(cfg, insert=tuple(range(L)))]).eval()
    missing, unexpected = tower.load_state_dict(saved['state_dict'],
                                                strict=False)
    assert not unexpected and not [k for k in missing
                                   if k.startswith('adapters.')]
    h, w = 12, 20
    x = torch.randn(2, 5 + h * w, D, generator=g)
    depth = torch.randn(2, 1 + h * w, D, generator=g)
    worst, losses = 0., []
    with torch.no_grad():
        for layer in range(L):
            a, loss = ref(x, depth, layer, has_cls_token=True)
            out = tower.adapters[str(layer)](x[:, 5:], hw=(h, w),
                                             second=depth[:, 1:])
            worst = max(worst, (a[:, 5:] - out.tokens).abs().max().item())
            # ours: loss_weight / num_layers per adapter (their mean)
            losses.append((loss.item(),
                           L * sum(out.aux_losses.values()).item()))
            x = torch.cat([x[:, :5], out.tokens], dim=1)
    print(f'released DepthMoE vs converted SpectralMoEAdapter, {L} layers, '
          f'D={D}, {h}x{w} tokens: max |difference| {worst:.2e} (tokens of '
          f'std {x[:, 5:].std().item():.2f}); balance loss per layer '
          '(released, ours): ' + ', '.join(f'({a:.4f}, {b:.4f})'
                                           for a, b in losses))
    return 0


if __name__ == '__main__':
    sys.exit(main())
