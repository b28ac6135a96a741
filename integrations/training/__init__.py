"""The training application shared by ``examples/train_cifar.py`` and
``examples/train_imagenet.py`` (installed as ``bame_apps.integrations.training``).

One frozen :class:`TrainingConfig` describes a run and :func:`run` trains it; only the command
line (:mod:`.cli`: :class:`ScriptConfig`, :func:`parse_config`, :func:`main`) knows about
``argparse``. The modules, one concept each:

* :mod:`.config`: :class:`TrainingConfig` (four frozen sections: ``inputs``, ``network``,
  ``optim``, ``outputs``; :meth:`TrainingConfig.build` from fields by name), the checks that
  span sections, :func:`~.config.config_dict`;
* :mod:`.sections`: the sections, each field declared once with its default and its
  :class:`~.options.Option` (help, flag, choices, bound); :mod:`.options`: that metadata and
  :class:`ConfigError` (a ``ValueError`` naming the field and value);
* :mod:`.cli`: the scripts' flags, built from the sections' metadata, errors turned into
  ``parser.error`` naming the flag;
* :mod:`.loop`: :func:`run`, the epochs under 🤗 Accelerate; :mod:`.launch`: the check
  that launched processes train together; :mod:`.protocols`: what the loop needs of the
  optimizer and the loaders;
* :mod:`.tracking`: live logging to Accelerate's trackers (``report_to``: TensorBoard, wandb);
* :mod:`.data`, :mod:`.build`: the datasets, the model and the method's optimizer;
* :mod:`.recipes`: per-model optimization defaults (DeiT's AdamW recipe for ``deit_small``);
* :mod:`.lr_schedule`: warm-up and cosine annealing per optimizer step (torch schedulers);
* :mod:`.sampling`: the epoch-seeded data order that makes resuming exact;
* :mod:`.checkpoints`, :mod:`.resume`: atomic checkpoints and where a run resumes;
* :mod:`.metrics`, :mod:`.plots`, :mod:`.mask_oscillation`: ``metrics.json`` (rewritten
  atomically after every epoch, with the library versions), the PNG plots, the accumulated SAD
  per N:M block (the paper's Figure 2).
"""

from .cli import ScriptConfig, build_parser, main, parse_config
from .config import ConfigError, TrainingConfig
from .loop import TrainResult, run
from .lr_schedule import make_lr_scheduler
from .sampling import EpochSampler, epoch_seed

__all__ = [
    "ConfigError",
    "EpochSampler",
    "ScriptConfig",
    "TrainResult",
    "TrainingConfig",
    "build_parser",
    "epoch_seed",
    "main",
    "make_lr_scheduler",
    "parse_config",
    "run",
]
