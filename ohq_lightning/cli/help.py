"""``python -m ohq_lightning --help``: what the job does, the recipes, the groups and where every key is explained.

Hydra prints ``hydra.help.template`` for ``--help``. :func:`register_help` stores this app's help in
Hydra's ``ConfigStore`` as the ``hydra/help`` option ``ohq_lightning`` (``conf/config.yaml`` selects it).
The recipes and the options of each group are listed from the YAML files the package ships, each
with the first sentence of the comment at its top, so the help cannot drift from the files.
``$`` placeholders are Hydra's; ``${hydra.runtime.choices.GROUP}`` is resolved when ``--help`` runs,
so the option marked as chosen is the one the given overrides pick.
"""

from __future__ import annotations

import re
import textwrap
from importlib.abc import Traversable
from importlib.resources import files

from hydra.core.config_store import ConfigStore

__all__ = ["HELP_NAME", "conf_directory", "help_template", "option_summaries", "register_help"]

HELP_NAME = "ohq_lightning"
"""The ``hydra/help`` option of this app."""
_CONF = "ohq_lightning.conf"
_HIDDEN_GROUPS = ("hydra", "recipe")  # Hydra's own groups, and the recipes (listed first, on their own)
_WIDTH = 110

_HEADER = """\
ohq_lightning: hardware-aware mixed-precision quantization of a timm image classifier, as one Hydra job.

The job, in order:
  1. float model: read from model.checkpoint=PATH (a state dict, a .safetensors file or a Lightning .ckpt),
     from timm's local cache (model.pretrained=true), or trained here for train.epochs epochs;
  2. search: the hardware target (hardware=...) gives every layer's cost at each precision option
     (the default, cpu, measures them on this CPU in ONNX Runtime); the ILP picks a mixed-precision
     plan under the ohq.* budgets (none given: the fastest plan as accurate as uniform INT8);
     ohq.plan=plan.json skips the search;
  3. fine-tune: quantization-aware training of the plan for ohq.qat_epochs epochs at ohq.qat_lr
     (ohq.qat_epochs=0: calibration only);
  4. deploy FP32, uniform INT8 and the plan on this machine's real kernels (eval.runtime) and report
     each one's test accuracy, size and measured latency, beside the latency the search predicted.
  Written to hydra.run.dir (outputs/<model>/<date>_<time>/): report.md, report.json, plan.json,
  plan.png, accuracy_latency.png, float_model.pt (when trained here) and the log, ohq_lightning.log.

Usage:
  python -m ohq_lightning +recipe=NAME [KEY=VALUE ...]     (or the ohq-lightning command)
  python -m ohq_lightning +recipe=resnet18 ohq.compression_ratio=0.5
  python -m ohq_lightning -m +recipe=resnet18 ohq.compression_ratio=0.5,0.7   (a sweep: one sweep.md)
"""

_FOOTER = """\
== Every key ==
  python -m ohq_lightning --cfg job [overrides]    prints the composed config: every key and its value.
  What each key means is the comment above it in the YAML files, in
    {conf}
  config.yaml (train, seed, hydra), GROUP/OPTION.yaml for each group above, recipe/NAME.yaml for the recipes.
  python -m ohq_lightning --hydra-help             Hydra's own flags (-m, --cfg, --info, --resolve, ...).
"""


def conf_directory() -> Traversable:
    """The package's config folder (``conf/`` in a checkout, ``ohq_lightning/conf`` in an installed wheel)."""
    return files(_CONF)


def _first_sentence(text: str) -> str:
    """The first sentence of the comment at the top of a YAML file (``""`` when it has none)."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#") or re.match(r"#\s*[a-z_]+:", line):  # a key or a key's own comment
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    comment = " ".join(lines)
    sentence = re.split(r"(?<=\.)\s", comment, maxsplit=1)[0]
    return re.sub(r"\$\{([^}]*)\}", r"<\1>", sentence)  # ${data.root} as <data.root>: no interpolation


def option_summaries(group: str) -> dict[str, str]:
    """Each option of a config group (its YAML files) with the first sentence of the comment at its top.

    Example:
        >>> option_summaries("trainer")["cpu"]
        'Lightning Trainer settings for float training and fine-tuning, on the CPU.'
    """
    folder = conf_directory() / group
    options = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".yaml"))
    return {name[: -len(".yaml")]: _first_sentence((folder / name).read_text()) for name in options}


def _groups() -> list[str]:
    """The config groups: folders of YAML files, but Hydra's own and the recipes."""
    folders = [entry for entry in conf_directory().iterdir() if entry.is_dir() and entry.name not in _HIDDEN_GROUPS]
    return sorted(f.name for f in folders if any(e.name.endswith(".yaml") for e in f.iterdir()))


def _listing(options: dict[str, str], width: int) -> list[str]:
    """One entry per option: its name padded to ``width``, then its sentence wrapped beside it."""
    lines = []
    for name, text in options.items():
        sentence = text.replace("$", "$$")  # a literal $ for Hydra's string.Template
        wrapped = textwrap.wrap(sentence, _WIDTH - width, break_on_hyphens=False) or [""]
        lines += [name.ljust(width) + wrapped[0], *(" " * width + rest for rest in wrapped[1:])]
    return lines


def help_template() -> str:
    """The text of ``--help``, as a Hydra help template (its ``${...}`` are resolved when ``--help`` runs)."""
    recipes = {f"  +recipe={name}": text for name, text in option_summaries("recipe").items()}
    groups = {
        group: {f"    {group}={name}": text for name, text in option_summaries(group).items()} for group in _groups()
    }
    width = max(len(label) for label in [*recipes, *(label for group in groups.values() for label in group)]) + 2
    lines = ["== Recipes (+recipe=NAME: a model and the training settings that suit it) ==", *_listing(recipes, width)]
    lines += ["", "== Configuration groups (GROUP=OPTION) =="]
    for group, options in groups.items():
        lines += [f"  {group} (chosen: ${{oc.select:hydra.runtime.choices.{group},none}})", *_listing(options, width)]
    footer = _FOOTER.format(conf=str(conf_directory()).replace("$", "$$"))
    return "\n".join([_HEADER, *lines, "", footer])


def register_help() -> None:
    """Store the help in Hydra's ``ConfigStore`` as the ``hydra/help`` option :data:`HELP_NAME`."""
    node = {"app_name": HELP_NAME, "header": "", "footer": "", "template": help_template()}
    ConfigStore.instance().store(group="hydra/help", name=HELP_NAME, node=node)
