"""What a run works on: the model (BatchNorm folded), its preprocessing, the calibration and evaluation images, and
the statistics it loaded or collected.  ``Session`` checks all of it before any pass starts; the passes
(``passes``) take a session and do one thing each."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset, Subset

from . import __version__
from .adaround import LearnedRounding
from .config import RunConfig
from .data import (
    CACHE_MEMORY_FRACTION,
    CachedDataset,
    DataError,
    cache_budget,
    cache_bytes,
    imagenet_val_dataset,
    make_loader,
    relative_paths,
    seeded_calibration,
    seeded_evaluation,
    wnid_folder_dataset,
)
from .dfq_bias import expected_inputs
from .distributed import DistContext
from .equalize import EqualizeError, batchnorm_moments, equalize
from .graph import relu_fed_layers
from .layers import activation_layers
from .models import build_model, fold_batchnorm, weights_fingerprint
from .stats import Statistics, StatisticsCollector, StatisticsError, folder_fingerprint, load_statistics

log = logging.getLogger("pytorch_quantizer")


class Session:
    """Model, images and statistics of one run, validated before any pass."""

    def __init__(self, cfg: RunConfig, dist: DistContext | None = None) -> None:
        """Validates everything a run needs (data, model, statistics, image sets) before any pass starts; the
        cheap checks (the image folders) come before the model's weights are loaded.

        ``dist`` (under torchrun, ``distributed.setup``): this process's rank; every pass then runs on the rank's
        shard and is reduced over the ranks (``passes.run_pass``), statistics are gathered to rank 0."""
        self.cfg = cfg
        self.dist = dist if dist is not None else DistContext()
        data = cfg.data
        torch.manual_seed(data.seed)
        self.device = self.dist.device if self.dist.device is not None else torch.device(cfg.device)
        self.dataset = imagenet_val_dataset(data.root)
        self.cal_dataset = self.dataset
        if data.cal_root is not None:
            self.cal_dataset = wnid_folder_dataset(data.cal_root, what="--cal-data folder")
        original, self.preprocess = build_model(cfg.arch, cfg.weights)
        decode = self.preprocess.decode_transform()
        for dataset in {id(d): d for d in (self.dataset, self.cal_dataset)}.values():
            dataset.transform = decode
        self.fingerprint = weights_fingerprint(original)
        self.stats_path = cfg.statistics_path(self.fingerprint)
        model, pairs = original, []
        if cfg.fold_bn:
            model, pairs = fold_batchnorm(original, self.example_input())
        # layer -> its output channels' (mean, std) by its folded BatchNorm, as the model below carries them
        self.bn_moments = batchnorm_moments(original, pairs)
        if cfg.equalize:  # the config refuses it unfolded
            equalized = equalize(model, self.example_input(), self.bn_moments)
            model, self.bn_moments = equalized.model, equalized.moments
            log.info(equalized.summary())
            if cfg.export_onnx is not None and isinstance(model, fx.GraphModule):  # refused now, not after the pass
                raise EqualizeError(f"{cfg.arch} calls a ReLU6 module at several places, so --equalize rewrote its "
                                    "graph with torch.fx, whose exported node names --export_onnx cannot map to its "
                                    "modules yet: export it without --equalize")
            if cfg.weight.bias_bits is not None:
                log.warning("--equalize divides channels by their scales, biases too, so biases quantized at int%d "
                            "per tensor lose the small ones: add --float_bias (int32 biases, as deployments keep "
                            "them)", cfg.weight.bias_bits)
        self.model = model.to(self.device).eval()
        # several GPUs: replicas share the hooks and parameters of self.model, which the quantizer edits
        self.runner: nn.Module = self.model
        if self.device.type == "cuda" and len(cfg.device_ids) > 1 and not self.dist.active:
            self.runner = nn.DataParallel(self.model, device_ids=list(cfg.device_ids))
        self.layers = activation_layers(self.model)
        self.calibration = self._calibration_indices()
        self.stats = self._load_statistics()
        if cfg.act.per_channel and self.stats is not None and not self.stats.has_channel_moments:
            raise StatisticsError(f"-pcq_a needs per-channel statistics, but {self.stats.folder} holds per-tensor ones "
                                  "only; collect them with -sm collect -pcq_a")
        self.stats_fingerprint = folder_fingerprint(self.stats.folder) if self.stats is not None else ""
        self.evaluation = self._evaluation_indices() if cfg.stats_mode != "collect" else []
        self.relu_caps: dict[str, float | None] | None = None  # the layers that only feed a ReLU, traced once
        self._expected_inputs: dict[str, torch.Tensor] | None = None  # dfq_bias's input means, traced once
        if cfg.act.half_range and cfg.stats_mode != "collect":
            if not self.relu_fed():
                log.warning("-hr: no conv/linear output of %s feeds only a ReLU-like activation, so every grid stays "
                            "two-sided (the half range changes nothing here)", cfg.arch)
        self._correction: DataLoader | None = None
        self.roundings: dict[str, LearnedRounding] = {}  # AdaRound's learned roundings by key (passes)
        if cfg.correct.act_bias:
            self.dist.check_items(len(self.correction_images()[1]), data.batch_size, "-bca calibration")
        if cfg.correct.data_free_bias:  # a graph fx cannot trace is refused now, not after a pass
            self.expected_inputs()
        if cfg.rounding.learned and cfg.stats_mode != "collect":  # refused now, not after a pass
            self.correction_images("AdaRound learns each layer's rounding")
        if cfg.stats_mode == "collect":
            self.dist.check_items(len(self.calibration), data.batch_size, "calibration")
        else:
            self.dist.check_items(len(self.evaluation), data.batch_size, "evaluation")
        log.info("%s on %s (%d CPU threads); %d BatchNorm layers folded", cfg.arch, self.device,
                 torch.get_num_threads(), len(pairs))

    def example_input(self) -> torch.Tensor:
        """Two random images of the model's input size, from the seed (for tracing and folding)."""
        return torch.randn(2, *self.preprocess.input_size, generator=torch.Generator().manual_seed(self.cfg.data.seed))

    # -- images ------------------------------------------------------------------------------------------------
    def _calibration_indices(self) -> list[int]:
        """The calibration images: ``cal_size`` drawn with the seed from the calibration folder, or all of them.
        Asking for more images than the folder has is an error."""
        size, total = self.cfg.data.cal_size, len(self.cal_dataset)
        if size is None:
            return list(range(total))
        if size > total:
            raise DataError(f"-cs {size} asks for more calibration images than the {total} in {self.cal_dataset.root}")
        return seeded_calibration(total, size, self.cfg.data.seed)

    def _evaluation_indices(self) -> list[int]:
        """The evaluation images: ``--data``'s val without the calibration images, ``subset`` of them drawn from the
        end of the seeded permutation (so ``-cs N --subset M`` give the images of the previous release).

        Left out: the ``cal_size`` images when they come from ``--data`` (so FP32 and quantized runs of one study
        see the same images), and in use mode also every image the statistics list as theirs when they were
        collected on this folder."""
        data, total = self.cfg.data, len(self.dataset)
        held_out: set[int] = set()
        if data.cal_size is not None and data.cal_root is None:
            held_out.update(self.calibration)
        if self.stats is not None:
            held_out.update(self._statistics_images())
        left = total - len(held_out)
        if not left:
            raise DataError(f"no image of {self.dataset.root} is left to evaluate on: all {total} were used for "
                            "calibration; collect with a smaller -cs N, or calibrate on another folder with --cal-data")
        if data.subset is not None and data.subset > left:
            log.warning("asked for %d evaluation images but %d are left; using all of them", data.subset, left)
        pool = seeded_evaluation(total, data.seed, held_out, data.subset)
        log.info("evaluation: %d of the %d images in %s (%d held out for calibration)", len(pool), total,
                 self.dataset.root, len(held_out))
        return pool

    def _statistics_images(self) -> list[int]:
        """Indices in ``--data`` of the images the loaded statistics were collected on (when on this folder)."""
        record = self.stats.meta.get("calibration")
        if record is None:
            log.warning("the statistics in %s do not say which images they were collected on (an older release); "
                        "evaluation leaves out only the -cs images of this run", self.stats.folder)
            return []
        if record.get("folder") != str(Path(self.dataset.root).resolve()):
            return []
        names = set(self.stats.calibration_images())
        return [i for i, name in enumerate(relative_paths(self.dataset)) if name in names]

    def relu_fed(self) -> dict[str, float | None]:
        """The layers whose output only feeds a ReLU (module path -> its cap), traced once per run."""
        if self.relu_caps is None:
            self.relu_caps = relu_fed_layers(self.model, self.example_input().to(self.device))
        return self.relu_caps

    def expected_inputs(self) -> dict[str, torch.Tensor]:
        """Layer path -> its input channels' means predicted from BatchNorm statistics (``dfq_bias``), traced once
        per run."""
        if self._expected_inputs is None:
            self._expected_inputs = expected_inputs(self.model, self.bn_moments)
            if self._expected_inputs:
                log.info("-bcdf: the input means of %d of %d layers are predicted from BatchNorm statistics (the "
                         "others read the image, or a value the BatchNorms do not describe: a concat, a product, an "
                         "activation of a residual sum)", len(self._expected_inputs), len(self.layers))
            else:
                log.warning("-bcdf: no layer's input has BatchNorm statistics to predict its mean from (BatchNorms "
                            "that are placeholders of mean 0 and variance 1, or none): nothing is corrected")
        return self._expected_inputs

    def correction_images(self, purpose: str = "-bca measures each layer's mean shift") -> tuple[Dataset, list[int]]:
        """The images ``-bca`` measures its shifts on and AdaRound learns on (``purpose`` says which, in the
        refusals): those the loaded statistics were collected on (they are held out of evaluation), else this run's
        ``-cs`` / ``--cal-data`` calibration images."""
        data = self.cfg.data
        if self.stats is not None:
            record = self.stats.meta.get("calibration")
            if record is None:
                raise DataError(f"{purpose} on the calibration images, but the statistics in {self.stats.folder} "
                                "do not list theirs (an older release); collect them again")
            folder = Path(record["folder"])
            source = next((d for d in (self.cal_dataset, self.dataset) if Path(d.root).resolve() == folder), None)
            if source is None:
                source = wnid_folder_dataset(folder, self.preprocess.decode_transform(),
                                             what="folder the statistics were collected on")
            index = {name: i for i, name in enumerate(relative_paths(source))}
            names = self.stats.calibration_images()
            missing = [name for name in names if name not in index]
            if missing:
                raise DataError(f"{purpose}: {len(missing)} calibration images of {self.stats.folder} are no longer in "
                                f"{folder} (first: {missing[0]})")
            return source, sorted(index[name] for name in names)
        if data.cal_size is None and data.cal_root is None:
            raise DataError(f"{purpose} on calibration images held out of evaluation: give -cs N or --cal-data DIR, "
                            "or use statistics (-sm use)")
        return self.cal_dataset, self.calibration

    def correction_loader(self) -> DataLoader:
        """The ``-bca`` images, cached: every round of every quantized pass reads them."""
        if self._correction is None:
            self._correction = self.loader_of(*self.correction_images(), passes=2)
        return self._correction

    def loader(self, calibration: bool, passes: int = 1) -> DataLoader:
        source, indices = (self.cal_dataset, self.calibration) if calibration else (self.dataset, self.evaluation)
        return self.loader_of(source, indices, passes)

    def loader_of(self, source: Dataset, indices: list[int], passes: int) -> DataLoader:
        """This rank's shard of ``indices`` in ``source`` (all of them in one process), cached for several passes."""
        data = self.cfg.data
        indices = [indices[i] for i in self.dist.shard(len(indices), data.batch_size)]
        dataset = source if len(indices) == len(source) else Subset(source, indices)
        budget = cache_budget()
        cache = data.cache
        if cache is None and passes > 1:
            estimate = cache_bytes(dataset)
            cache = estimate <= budget
            if not cache:
                log.info("%d passes over %d images decode them afresh each time: caching them would take about "
                         "%.0f MiB, over the %.0f MiB allowed (%.0f %% of the available memory)", passes,
                         len(dataset), estimate / 2**20, budget / 2**20, 100 * CACHE_MEMORY_FRACTION)
        normalize = self.preprocess.normalize_transform()
        if cache:
            dataset = CachedDataset(dataset, transform=normalize, workers=data.workers, max_bytes=max(budget, 1))
            return make_loader(dataset, data.batch_size, workers=0)
        return make_loader(Mapped(dataset, normalize), data.batch_size, workers=data.workers)

    # -- statistics --------------------------------------------------------------------------------------------
    def model_meta(self) -> dict:
        cfg = self.cfg
        return {"arch": cfg.arch, "weights": cfg.weights, "fingerprint": self.fingerprint, "bn_folded": cfg.fold_bn,
                "equalized": cfg.equalize, "seed": cfg.data.seed, "version": __version__}

    def _load_statistics(self) -> Statistics | None:
        if not self.cfg.needs_statistics:
            if self.cfg.stats_mode == "use":
                log.info("no --qtype: activations stay in float, no statistics are used")
            return None
        stats = load_statistics(self.stats_path)
        identity = ("arch", "fingerprint", "bn_folded", "equalized")  # what statistics of another model differ in
        expected = {k: v for k, v in self.model_meta().items() if k in identity}
        stats.check_model(expected)
        stats.check_layers(self.layers)
        return stats

    def save_statistics(self, collector: StatisticsCollector, folder: Path,
                        before_swap: Callable[[], object] | None = None) -> None:
        """Write what ``collector`` gathered over the calibration images to ``folder`` (replaced only when
        complete), with the model's identity and the images' names; ``before_swap()`` runs when they are staged,
        with ``stats_fingerprint`` already theirs (the run's last writes, before the earlier folder is replaced)."""
        names = relative_paths(self.cal_dataset)
        images = [names[i] for i in self.calibration]
        meta = {**self.model_meta(), "calibration": {
            "folder": str(Path(self.cal_dataset.root).resolve()), "cal_set_size": self.cfg.data.cal_size}}

        def staged(staging: Path) -> None:
            self.stats_fingerprint = folder_fingerprint(staging)  # names and bytes: the swapped folder's too
            if before_swap is not None:
                before_swap()

        collector.save(folder, meta, calibration=images, before_swap=staged)
        log.info("statistics of %d images saved to %s", collector.samples, folder)

    def use_statistics(self, stats: Statistics) -> None:
        """Adopt statistics collected in this run (``--compare`` calibrates, then evaluates): evaluation then
        leaves out the images they list, as in use mode."""
        self.stats = stats
        self.stats_fingerprint = folder_fingerprint(stats.folder)
        self.evaluation = self._evaluation_indices()

    def image_sources(self) -> str:
        """How the evaluation images and the calibration images of the statistics were chosen, as one sentence for
        the subtitles of the pages a run draws: a reader of a table must know whether calibration and evaluation
        share a folder (the evaluated images are then held out of the calibration ones) or come from two (ImageNet's
        train/val protocol), how many images each side has and which seed drew them."""
        data = self.cfg.data
        folder, count = Path(self.dataset.root).resolve(), len(self.evaluation)
        subset = f" drawn with seed {data.seed}" if data.subset is not None else ""
        evaluated = f"{count} evaluation images{subset} from {folder}"
        if self.stats is None:
            return f"{evaluated}; no calibration"
        images, record = self.stats.meta["images"], self.stats.meta.get("calibration")
        if record is None:
            return f"{evaluated}; {images} calibration images of a folder the statistics do not name (older release)"
        cal_folder, seed = Path(record["folder"]), self.stats.meta.get("seed", "?")
        if cal_folder == folder:
            return (f"{count} evaluation images{subset} held out of the {images} calibration images of {folder} "
                    f"(drawn with seed {seed})")
        if record.get("cal_set_size") is None:
            return f"{evaluated}; all {images} images of {cal_folder} for calibration"
        return f"{evaluated}; {images} calibration images drawn with seed {seed} from {cal_folder}"

    def identity(self) -> dict:
        """The provenance columns of a results row: weights, statistics and images."""
        collected = self.cfg.stats_mode == "collect"
        stats_folder = self.stats_path if collected or self.stats is not None else ""
        cal_images = len(self.calibration) if collected else self.stats.meta["images"] if self.stats else 0
        return {"weights_fingerprint": self.fingerprint, "stats_folder": str(stats_folder),
                "stats_fingerprint": self.stats_fingerprint, "cal_images": cal_images,
                "eval_images": len(self.evaluation)}


class Mapped(Dataset):
    """Applies a tensor transform to the first item of each sample (decode → normalize split)."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return self.transform(image), target
