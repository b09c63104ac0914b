r"""The peer: timm's CoAtNet train (or inference) step, measured the way train_throughput.py is.

  python benchmarks/timm_peer.py --model coatnet_0_224 --batch 256 --steps 20 --warmup 5 \
      [--compile] [--mode inference] [--res 224]

On CUDA: bf16 autocast, channels_last, cudnn.benchmark, ``torch.optim.AdamW(fused=True)``,
cross-entropy; ``--compile`` wraps the model in ``torch.compile`` and turns timm's fused attention
off first (with it, the compiled backward fails: "bias last dimension must be contiguous").
On CPU (the tests) the same code runs in float32 with the plain AdamW. Compile time is the first
(warm-up) step's time, compile included; peak memory is ``torch.cuda.max_memory_allocated``.
FLOPs per image are counted by ``torch.utils.flop_counter`` on one forward pass (x 3 for training).
The last line is one JSON object.
"""

import argparse
import json
import time

# Dense bf16 peak FLOP/s (vendor figures), the same as coatnet_jax.metrics.PEAK_FLOPS for GPUs.
PEAK_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10G': 70e12}


def forward_flops(model, res: int, device) -> int:
  import torch  # pylint: disable=g-import-not-at-top  (so that --help needs no torch)
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top
  model.eval()
  with torch.no_grad(), FlopCounterMode(display=False) as counter:
    model(torch.zeros(1, 3, res, res, device=device))
  return counter.get_total_flops()


def run(model_name='coatnet_0_224', batch=256, res=224, steps=20, warmup=5, compile_=False,
        mode='train', num_classes=1000) -> dict:
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available()
  device = torch.device('cuda' if cuda else 'cpu')
  if compile_:
    timm.layers.set_fused_attn(False)
  torch.backends.cudnn.benchmark = True
  model = timm.create_model(model_name, pretrained=False, num_classes=num_classes,
                            img_size=res).to(device)
  flops = forward_flops(model, res, device) * (3 if mode == 'train' else 1)
  fmt = torch.channels_last if cuda else torch.contiguous_format
  model = model.to(memory_format=fmt)
  images = torch.randn(batch, 3, res, res, device=device).to(memory_format=fmt)
  labels = torch.randint(0, num_classes, (batch,), device=device)
  autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda)
  net = torch.compile(model) if compile_ else model

  if mode == 'train':
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=cuda)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
      with autocast:
        loss = loss_fn(net(images), labels)
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
  else:
    model.eval()

    def step():
      with torch.inference_mode(), autocast:
        net(images)

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  step()  # The first step compiles (torch.compile, cudnn autotuning).
  sync()
  compile_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    step()
  sync()
  t0 = time.perf_counter()
  for _ in range(steps):
    step()
  sync()
  elapsed = time.perf_counter() - t0

  img_per_s = batch * steps / elapsed
  kind = torch.cuda.get_device_name() if cuda else 'cpu'
  peak = next((v for k, v in PEAK_FLOPS.items() if k in kind), None)
  return {
      'impl': 'timm' + ('+compile' if compile_ else ''), 'model': model_name, 'mode': mode,
      'batch': batch, 'res': res, 'dtype': 'bfloat16' if cuda else 'float32', 'steps': steps,
      'img_per_s': img_per_s, 'step_ms': 1e3 * elapsed / steps, 'gflops_per_img': flops / 1e9,
      'mfu': img_per_s * flops / peak if peak else None,
      'peak_mem_gib': torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
      'compile_s': compile_s, 'device': kind, 'torch': torch.__version__,
      'timm': timm.__version__}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='coatnet_0_224')
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--res', type=int, default=224)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--compile', action='store_true')
  p.add_argument('--mode', default='train', choices=['train', 'inference'])
  p.add_argument('--num_classes', type=int, default=1000)
  a = p.parse_args(argv)
  print(json.dumps(run(a.model, a.batch, a.res, a.steps, a.warmup, a.compile, a.mode,
                       a.num_classes)))


if __name__ == '__main__':
  main()
