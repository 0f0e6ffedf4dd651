"""Streamed layers: a decoder layer whose saved activations wait in pinned CPU memory between its forward and its
backward, instead of being recomputed (gradient checkpointing) or kept on the GPU.

A checkpointed layer keeps one tensor (its input) and pays for it with a second forward in the backward, about a
third of the layer's work with a frozen 4-bit base (whose backward computes only the gradient of the input). A
streamed layer pays with PCIe traffic instead: everything autograd saves in it (about 110 KB a token a layer on
the 8B shape) is copied out on a side stream while the next layers compute, and copied back in the backward one
layer ahead of its use. Where the bus keeps up, a streamed layer costs no compute; where it does not, the backward
waits for it. On an H200 over PCIe it does not (2026-12-03, bench/RESULTS.md: about 110 KB a token a layer, 13 ms
on the bus against 5 ms of recomputation at 896x896 and batch 8; 1.5-8% slower with a third of the layers
streamed), so it is off by default. Whether it pays on a given GPU, micro-batch and image size is measured, not
assumed: with `streamed_layers: auto` the plan (curriculum/plan.py) times its chosen plan with some of the
checkpointed layers streamed, and keeps one only when it is faster within the memory budget.

The streamed layers are the first ones: their copies leave first, and are needed last. Torch's documented
`saved_tensors_hooks` see what autograd saves; the rest is streams and events, as torchtune's and TRL's
OffloadActivations do for a whole model (they copy a tensor back only when its backward needs it; here the layer
below is already on its way).

On a CPU (tests) a "copy out" is a clone in the same memory, so the bookkeeping runs the same way.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: not worth a copy each way


@dataclass
class Packed:
    """One saved tensor, copied out: the host copy of its whole storage, and how to view it again."""

    host: Any
    shape: tuple
    stride: tuple
    uses: int = 1  # how many times autograd saved this same tensor (q, k and v read one input); unpacked as often


@dataclass
class LayerSaved:
    """What one streamed layer saved in one forward."""

    index: int
    device: Any = None  # where its tensors came from
    packed: list[Packed] = field(default_factory=list)
    by_pointer: dict = field(default_factory=dict)  # data_ptr, dtype, shape, stride -> Packed (this forward only)
    alive: list = field(default_factory=list)  # the GPU tensors being copied, held until the layer's forward ends
    back: dict = field(default_factory=dict)  # id(Packed) -> (GPU tensor, event) once copied back
    fetching: bool = False


class StreamedActivations:
    """The saved-tensor hooks of the streamed layers of one model, and their copies."""

    def __init__(self, model):
        self.weights = {p.data_ptr() for p in model.parameters()}
        self.saved: dict[int, LayerSaved] = {}  # layer index -> this forward's (the backward reads them)
        self.streams = {}

    def side_stream(self, device):
        import torch

        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device=device)
        return self.streams[device]

    # -- the forward: copy out ------------------------------------------------------------------------------------

    def run_layer(self, index: int, forward, *args, **kwargs):
        import torch

        if not torch.is_grad_enabled():  # evaluation: nothing is saved
            return forward(*args, **kwargs)
        layer = self.saved[index] = LayerSaved(index)
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(self.pack, layer),
                                                      functools.partial(self.unpack, layer)):
            out = forward(*args, **kwargs)
        # the copies hold their sources through record_stream: the memory is reused only after they have read it
        layer.alive.clear()
        layer.by_pointer.clear()
        return out

    def pack(self, layer: LayerSaved, tensor):
        import torch

        nbytes = tensor.numel() * tensor.element_size()
        if (nbytes < MIN_BYTES or tensor.data_ptr() in self.weights or tensor.storage_offset() != 0
                or tensor.untyped_storage().nbytes() != nbytes):
            return tensor  # small, a weight, or a view of part of a larger buffer: stays
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key in layer.by_pointer:  # saved again within this forward (it is still alive: the pointer is its own)
            layer.by_pointer[key].uses += 1
            return layer.by_pointer[key]
        flat = torch.as_strided(tensor.detach(), (tensor.numel(),), (1,))  # its whole storage, in memory order
        if tensor.device.type == "cuda":
            side = self.side_stream(tensor.device)
            side.wait_stream(torch.cuda.current_stream(tensor.device))
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            with torch.cuda.stream(side):
                host.copy_(flat, non_blocking=True)
            tensor.record_stream(side)
        else:
            host = flat.clone()
        packed = Packed(host, tuple(tensor.shape), tensor.stride())
        layer.device = tensor.device
        layer.packed.append(packed)
        layer.by_pointer[key] = packed
        layer.alive.append(tensor)
        return packed

    # -- the backward: copy in, one layer ahead --------------------------------------------------------------------

    def fetch(self, layer: LayerSaved | None, device) -> None:
        """Start copying a layer's saved tensors back to `device` (once)."""
        import torch

        if layer is None or layer.fetching:
            return
        layer.fetching = True
        if device.type != "cuda":
            layer.back = {id(p): (p.host, None) for p in layer.packed}
            return
        side = self.side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for p in layer.packed:
                gpu = p.host.to(device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
                layer.back[id(p)] = (gpu, done)

    def unpack(self, layer: LayerSaved, packed):
        import torch

        if not isinstance(packed, Packed):
            return packed
        device = layer.device
        self.fetch(layer, device)  # no-op when the layer above already started it
        gpu, done = layer.back.get(id(packed), (None, None))
        if gpu is None:  # unpacked more often than saved (retain_graph): copy it again
            gpu, done = packed.host.to(device, non_blocking=True), None
        if done is not None:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(done)
            gpu.record_stream(stream)  # copied on the side stream, used on this one: freed after this use
        packed.uses -= 1
        if packed.uses <= 0:
            layer.back.pop(id(packed), None)
        if all(p.uses <= 0 for p in layer.packed):
            self.saved.pop(layer.index, None)
        return torch.as_strided(gpu, packed.shape, packed.stride)

    def prefetch_below(self, index: int, grad) -> None:
        """A gradient hook on layer `index + 1`'s output: its gradient is ready, so that layer's backward comes
        next; start copying layer `index`'s tensors back while it runs."""
        self.fetch(self.saved.get(index), grad.device)


def stream_layers(model, layers, n: int) -> int:
    """Stream the first n of `layers` (the language model's decoder layers); the others are left as they are (the
    caller makes them checkpointed or not). Every call sets every layer anew, so a plan can try one count after
    another. Returns n."""
    import torch

    streaming = getattr(model, "_streamed_activations", None)
    if streaming is None:
        streaming = StreamedActivations(model)
        model._streamed_activations = streaming
    for i, layer in enumerate(layers):
        if getattr(layer.__dict__.get("forward"), "streamed", False):
            del layer.forward  # back to the forward it had
        hook = layer.__dict__.pop("_streaming_prefetch_hook", None)
        if hook is not None:
            hook.remove()
        if i < n:
            layer.forward = functools.partial(streaming.run_layer, i, layer.forward)
            layer.forward.streamed = True
        if 0 < i <= n:  # the layer above a streamed one announces its backward
            def announce(module, args, output, below=i - 1):
                hidden = output[0] if isinstance(output, tuple) else output
                if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                    hidden.register_hook(lambda grad: streaming.prefetch_below(below, grad))

            layer._streaming_prefetch_hook = layer.register_forward_hook(announce)
    return n


def check_streaming(device) -> str | None:
    """Three small residual blocks trained one step with the first two streamed and without: None when the loss
    and every gradient are the same, else what differs. On a GPU this runs the copies, streams and events as
    training will, before the first step (a missed wait shows as other numbers, or as garbage)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.norm, self.up, self.down = (torch.nn.LayerNorm(width), torch.nn.Linear(width, 2 * width),
                                             torch.nn.Linear(2 * width, width))

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    width, rows = 256, 2048  # each saved activation 2 MiB in float32: above MIN_BYTES
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block(width) for _ in range(3))).to(device)
    x = torch.randn(rows, width, device=device)
    results = []
    for streamed in (0, 2):
        stream_layers(model, list(model), streamed)
        model.zero_grad()
        inputs = x.clone().requires_grad_(True)
        loss = model(inputs).square().mean()
        loss.backward()
        results.append([loss.detach()] + [inputs.grad] + [p.grad.clone() for p in model.parameters()])
    stream_layers(model, list(model), 0)
    names = ["the loss", "the input's gradient"] + [f"{n}'s gradient" for n, _ in model.named_parameters()]
    for name, plain, streamed in zip(names, *results, strict=True):
        if not torch.allclose(plain, streamed, rtol=1e-5, atol=1e-6):
            return f"{name} differs with the layers streamed (by {(plain - streamed).abs().max().item():.3g})"
    return None
