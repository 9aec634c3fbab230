"""Label-free measures of a quantized network: how closely its logits follow the FP32 network's on the same images.

Without labels (a handful of demo photos, or any unlabelled folder) accuracy means nothing, but the FP32 pass is a
reference the quantized pass can be held against, image by image:

* top-1 agreement: the percentage of images whose quantized argmax is the FP32 argmax;
* SQNR (signal-to-quantization-noise ratio) of the logits, in dB:
  ``10 * log10(sum(ref ** 2) / sum((q - ref) ** 2))`` summed over every logit of every image, i.e. the energy of the
  reference logits over the energy of the error the quantization added to them.  Each 6.02 dB is about one more bit of
  precision; +inf means identical logits;
* the largest absolute difference of any logit.

Usage: record the FP32 pass's logits with ``ReferenceLogits.record(batch_index, logits)``, then for each quantized
pass over the same batches in the same order ``agreement.add(logits, reference[batch_index])``.

This module imports only torch, so any layer of the package (or a script) can use it.
"""

from __future__ import annotations

import math

import torch


def _check_pair(logits: torch.Tensor, reference: torch.Tensor) -> None:
    """ValueError unless both are 2-D ``[images, classes]`` tensors of one shape."""
    if not isinstance(logits, torch.Tensor) or not isinstance(reference, torch.Tensor):
        raise ValueError(f"logits and reference must be tensors, got {type(logits).__name__} and "
                         f"{type(reference).__name__}")
    if logits.dim() != 2 or logits.shape != reference.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} must both be "
                         "[images, classes] of the same shape: the same images, in the same order, through the "
                         "same classifier")


class LogitAgreement:
    """Accumulates a quantized pass's logits against the reference (FP32) logits of the same images, batch by batch.

    Only running counts and sums are kept (a few numbers), so it costs nothing over any number of batches, and
    adding the batches one by one gives the same result as adding them as one batch (up to float64 rounding).

    The differences and sums are taken in float64.  The SQNR divides two sums of squares over every logit of every
    image: 1000 an ImageNet image, 50 million over the validation set.  A float32 sum keeps about 7 significant
    digits, and how much of them it loses depends on the reduction order, which changes with the batch size and the
    device (CPU or CUDA kernels sum in different orders); float64 (16 digits) makes the result independent of both
    to far below the printed precision, so runs with different batch sizes or devices report the same dB.  The
    difference ``q - ref`` of two float32 logits is exact in float64 (for logits of similar magnitude), where in
    float32 it would round before being squared.
    """

    def __init__(self) -> None:
        self._images = 0
        self._agreeing = 0
        self._classes: int | None = None
        self._signal = 0.0  # sum of reference ** 2 (float64)
        self._noise = 0.0  # sum of (logits - reference) ** 2 (float64)
        self._max_abs = 0.0

    def add(self, logits: torch.Tensor, reference: torch.Tensor) -> None:
        """Add one batch: ``logits`` of the quantized pass and ``reference`` of the FP32 pass, both
        ``[images, classes]`` for the same images in the same order (any devices and float dtypes; ``reference`` is
        moved to ``logits``' device).  A shape mismatch, or a class count other than earlier batches', raises
        ValueError."""
        _check_pair(logits, reference)
        if self._classes is not None and logits.shape[1] != self._classes:
            raise ValueError(f"logits have {logits.shape[1]} classes, earlier batches had {self._classes}")
        self._classes = int(logits.shape[1])
        if logits.shape[0] == 0:
            return
        with torch.no_grad():
            q = logits.detach().to(torch.float64)
            ref = reference.detach().to(device=q.device, dtype=torch.float64)
            diff = q - ref
            self._agreeing += int((q.argmax(dim=1) == ref.argmax(dim=1)).sum().item())
            self._signal += float(ref.square().sum().item())
            self._noise += float(diff.square().sum().item())
            largest = float(diff.abs().max().item())
            # NaN sticks (Python's max would drop it: NaN compares False), so a broken pass cannot look exact
            if not math.isnan(self._max_abs) and (math.isnan(largest) or largest > self._max_abs):
                self._max_abs = largest
        self._images += int(logits.shape[0])

    @classmethod
    def merged(cls, parts: list[LogitAgreement]) -> LogitAgreement:
        """One agreement over the images of every part (the shards of a torchrun pass, in rank order)."""
        out = cls()
        for part in parts:
            if part._classes is not None and out._classes is not None and part._classes != out._classes:
                raise ValueError(f"cannot merge agreements over {out._classes} and {part._classes} classes")
            out._classes = part._classes if part._classes is not None else out._classes
            out._images += part._images
            out._agreeing += part._agreeing
            out._signal += part._signal
            out._noise += part._noise
            if math.isnan(part._max_abs) or part._max_abs > out._max_abs:
                out._max_abs = part._max_abs if not math.isnan(out._max_abs) else out._max_abs
        return out

    @property
    def images(self) -> int:
        """Images added so far."""
        return self._images

    @property
    def agreeing(self) -> int:
        """Images whose argmax matches the reference's."""
        return self._agreeing

    @property
    def top1_agreement(self) -> float:
        """Percentage (0..100) of the images whose argmax is the reference's argmax (ties go to the lowest index,
        in both)."""
        self._need_images()
        return 100.0 * self._agreeing / self._images

    @property
    def sqnr_db(self) -> float:
        """``10 * log10(sum(ref ** 2) / sum((q - ref) ** 2))`` over all logits of all images, in dB; +inf when the
        logits equal the reference (no noise), -inf for all-zero reference logits with some noise, NaN when a logit
        was NaN."""
        self._need_images()
        if math.isnan(self._signal) or math.isnan(self._noise):
            return math.nan
        if self._noise == 0.0:
            return math.inf
        if self._signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self._signal / self._noise)

    @property
    def max_abs_diff(self) -> float:
        """Largest ``|q - ref|`` of any logit of any image; NaN once any logit was NaN."""
        self._need_images()
        return self._max_abs

    def _need_images(self) -> None:
        if self._images == 0:
            raise ValueError("no images added: LogitAgreement.add() at least one non-empty batch first")

    def __repr__(self) -> str:
        if self._images == 0:
            return "LogitAgreement(images=0)"
        return (f"LogitAgreement(images={self._images}, top1_agreement={self.top1_agreement:.2f}%, "
                f"sqnr_db={self.sqnr_db:.2f}, max_abs_diff={self._max_abs:.4g})")


class ReferenceLogits:
    """The FP32 pass's logits, kept per batch index so that each quantized pass can be compared batch by batch.

    Stored as CPU float32 copies: a copy, because a model may reuse its output buffer; on the CPU, so that a long
    run holds no GPU memory for them.  Memory is small: 1000 classes x 4 bytes = 4 KB an image, so 4 MB per 1000
    images and 200 MB for all 50,000 ImageNet validation images (the 15 demo images take 60 KB).  ``nbytes`` says
    what is held.
    """

    def __init__(self) -> None:
        self._batches: dict[int, torch.Tensor] = {}

    def record(self, batch: int, logits: torch.Tensor) -> None:
        """Keep ``logits`` (``[images, classes]``) of batch number ``batch``; a batch recorded twice is an error
        (ValueError), since the passes must see the same batches once each."""
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"reference logits must be an [images, classes] tensor, got {shape}")
        if batch in self._batches:
            raise ValueError(f"reference logits of batch {batch} were already recorded")
        self._batches[batch] = logits.detach().to(device="cpu", dtype=torch.float32, copy=True)

    def __getitem__(self, batch: int) -> torch.Tensor:
        """The recorded logits of batch ``batch`` (KeyError naming the recorded range when there are none)."""
        try:
            return self._batches[batch]
        except KeyError:
            have = f"batches {min(self._batches)}..{max(self._batches)}" if self._batches else "no batches"
            raise KeyError(f"no reference logits for batch {batch} (recorded: {have}); record the FP32 pass over "
                           "the same loader first") from None

    def __contains__(self, batch: object) -> bool:
        return batch in self._batches

    def __len__(self) -> int:
        """Batches recorded."""
        return len(self._batches)

    @property
    def images(self) -> int:
        """Images over all recorded batches."""
        return sum(int(t.shape[0]) for t in self._batches.values())

    @property
    def nbytes(self) -> int:
        """Bytes the recorded logits take."""
        return sum(t.element_size() * t.nelement() for t in self._batches.values())
