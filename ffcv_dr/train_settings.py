"""The settings of ``ffcv-dr train``: their defaults, and every one checked
before any work, so that a bad one is one line naming it rather than a
traceback, or, worse, a run that trains nothing and exits 0."""
from __future__ import annotations

import copy
import math
import numbers
import os

import yaml

ORDERS = ('random', 'quasi_random')  # FFCV's OrderOption names, lower case

# Every setting: (default, what it means). ``ffcv-dr train --show-settings``
# prints this table as a YAML file to start from.
SETTINGS = {
    'data': {
        'train': (None, 'the ffcv-dr .beton to train on'),
        'val': (None, 'a plain FFCV .beton or an ImageFolder to evaluate on (optional)'),
        'workers': (os.cpu_count(), 'decoding threads per process'),
        'batch_size': (256, 'images per step per process (the global batch is this x processes)'),
        'image_size': (None, "side the loader renders (default: the model's input_size, else the recipe's)"),
        'val_crop_ratio': (0.875, 'centre crop of the validation images (1.0: the whole image)'),
        'p': (1.0, 'dr: probability of a stored reinforcement, else a fresh view (ml-dr: 0.99)'),
        'os_cache': (True, 'false: a file bigger than memory, read page by page (with quasi_random)'),
        'order': ('random', ' | '.join(ORDERS)),
        'seed': (0, 'seeds the order and which reinforcement each image replays'),
    },
    'model': {
        'arch': ('resnet50', 'a timm name, or bundled:efficientnet_lite0'),
        'pretrained': (False, 'start from published weights (timm: the hub; bundled: the package)'),
        'input_size': (None, "side the network sees (default: the data's)"),
        'drop_path': (0.0, 'stochastic depth rate'),
    },
    'train': {
        'mode': ('dr', 'erm: labels | dr: stored soft targets | kd: a teacher run online'),
        'epochs': (16, 'passes over the data'),
        'optimizer': ('sgd', 'sgd | adamw'),
        'lr': (0.5, 'peak learning rate for a global batch of 256; scaled by batch_size x processes / 256'),
        'momentum': (0.9, 'sgd momentum'),
        'weight_decay': (5e-5, 'weight decay'),
        'schedule': ('cosine', 'cosine | step, after a linear warm-up, per step'),
        'warmup_epochs': (1, 'linear warm-up, in epochs'),
        'step_epochs': ([], 'step: decay by step_gamma at these epochs'),
        'step_gamma': (0.1, 'step: the decay factor'),
        'label_smoothing': (0.1, 'erm only'),
        'amp': (True, 'mixed precision: float16 on a GPU, bfloat16 on the CPU'),
        'channels_last': (True, 'channels_last memory format'),
        'ema_decay': (0.0, 'EMA of the weights (0: none; e.g. 0.9998)'),
        'eval_every': (1, 'evaluate every n-th epoch (and always after the last)'),
        'checkpoint_every': (0, 'also checkpoint every n-th step inside an epoch (0: at epoch ends only)'),
        'teacher': ('bundled:efficientnet_lite0', 'kd only: timm names, comma-separated for an ensemble'),
        'teacher_checkpoints': ([], 'kd only: a local checkpoint per teacher'),
        'teacher_pretrained': (True, 'kd only: teachers with published weights'),
        'teacher_size': (None, "kd only: side the teacher sees (default: its pretrained config's)"),
    },
    'resolution': {  # ffcv-imagenet's progressive resizing, off while min_res is null
        'min_res': (None, 'side until start_ramp (null: no ramp)'),
        'max_res': (None, 'side from end_ramp on'),
        'start_ramp': (0, 'epoch the linear ramp starts (steps of 32 px)'),
        'end_ramp': (0, 'epoch it reaches max_res'),
        'val_res': (None, 'validation side (default: the largest training side)'),
    },
    'output': {'folder': ('out/train', 'checkpoint.pt, log.jsonl, config.yaml, reliability.png')},
    'device': (None, 'default: cuda when available (cuda:LOCAL_RANK under torchrun), else cpu'),
}
DEFAULTS = {section: ({name: default for name, (default, _) in entries.items()}
                      if isinstance(entries, dict) else entries[0])
            for section, entries in SETTINGS.items()}


def show_settings() -> str:
    """Every setting with its default and meaning, as a YAML file to edit."""
    lines = ['# ffcv-dr train settings: the defaults. Save, edit, and pass with --config FILE;',
             '# --set SECTION.KEY=VALUE overrides one. Every value is checked before any work.']
    for section, entries in SETTINGS.items():
        if not isinstance(entries, dict):
            lines.append(f'{section}: {_scalar(entries[0])}'.ljust(40) + f'  # {entries[1]}')
            continue
        lines.append(f'{section}:')
        for name, (default, meaning) in entries.items():
            lines.append(f'  {name}: {_scalar(default)}'.ljust(40) + f'  # {meaning}')
    return '\n'.join(lines)


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()


MODES = ('erm', 'dr', 'kd')
SCHEDULES = ('cosine', 'step')
OPTIMIZERS = ('sgd', 'adamw')


def load_config(path: str = None, overrides=()) -> dict:
    """DEFAULTS, then the YAML file, then ``section.key=value`` overrides
    (values parsed as YAML); unknown keys, and values of the wrong type or
    out of range, are errors naming the setting."""
    cfg = copy.deepcopy(DEFAULTS)
    items = []
    if path:
        with open(path) as f:
            loaded = _yaml(f.read(), path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f'{path}: must be a mapping of sections (data:, model:, train:, ...), '
                             f'not a {type(loaded).__name__}')
        items += list(loaded.items())
    for item in overrides:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise ValueError(f'--set {item!r}: expected section.key=value')
        section, _, name = key.partition('.')
        value = _yaml(value, f'--set {item}')
        items.append((section, {name: value} if name else value))
    for section, value in items:
        if section not in cfg:
            raise ValueError(f'unknown setting {section!r} (known: {", ".join(cfg)})')
        if isinstance(cfg[section], dict):
            if not isinstance(value, dict):
                raise ValueError(f'{section}: must be a mapping of settings ({", ".join(cfg[section])}), '
                                 f'got {value!r}')
            unknown = set(value) - set(cfg[section])
            if unknown:
                raise ValueError(f'unknown setting {section}.{sorted(unknown)[0]} '
                                 f'(known: {", ".join(cfg[section])})')
            cfg[section].update(value)
        else:
            cfg[section] = value
    check(cfg)
    return cfg


class _UniqueKeys(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (which
    it would otherwise take silently, the last one winning)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key, which the base class refuses
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f'found duplicate key {key!r}',
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml(text: str, where: str):
    try:
        return yaml.load(text, Loader=_UniqueKeys)
    except yaml.YAMLError as e:
        problem = ' '.join(str(getattr(e, 'problem', None) or e).split())
        mark = getattr(e, 'problem_mark', None)
        at = f' (line {mark.line + 1}, column {mark.column + 1})' if mark else ''
        raise ValueError(f'{where}: not valid YAML{at}: {problem}') from None


def _int(low, high=None, optional=False):
    def ok(v):
        return (v is None and optional) or (isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                            and v >= low and (high is None or v <= high))
    what = f'an integer of at least {low}' if high is None else f'an integer from {low} to {high}'
    return ok, what + (' (or null)' if optional else '')


def _real(low, high=math.inf, above_low=False, below_high=False):
    def ok(v):
        return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                and (v > low if above_low else v >= low) and (v < high if below_high else v <= high))
    lo = f'above {low}' if above_low else f'at least {low}'
    hi = '' if high == math.inf else (f' and below {high}' if below_high else f' and at most {high}')
    return ok, f'a number {lo}{hi}'


def _one_of(*choices):
    return (lambda v: v in choices), 'one of ' + ', '.join(choices)


def _text(optional=False):
    return ((lambda v: (v is None and optional) or (isinstance(v, str) and v != '')),
            'a non-empty string' + (' (or null)' if optional else ''))


FLAG = (lambda v: isinstance(v, bool)), 'true or false'
RULES = {
    'data': {'train': _text(), 'val': _text(optional=True), 'workers': _int(1), 'batch_size': _int(1),
             'image_size': _int(1, optional=True), 'val_crop_ratio': _real(0, 1, above_low=True),
             'p': _real(0, 1), 'os_cache': FLAG, 'order': _one_of(*ORDERS), 'seed': _int(0, 2 ** 63 - 1)},
    'model': {'arch': _text(), 'pretrained': FLAG, 'input_size': _int(1, optional=True),
              'drop_path': _real(0, 1, below_high=True)},
    'train': {'mode': _one_of(*MODES), 'epochs': _int(1), 'optimizer': _one_of(*OPTIMIZERS),
              'lr': _real(0, above_low=True), 'momentum': _real(0, 1, below_high=True),
              'weight_decay': _real(0), 'schedule': _one_of(*SCHEDULES), 'warmup_epochs': _real(0),
              'step_epochs': ((lambda v: isinstance(v, list) and all(_int(0)[0](e) for e in v)),
                              'a list of epochs (integers of at least 0)'),
              'step_gamma': _real(0, 1, above_low=True), 'label_smoothing': _real(0, 1, below_high=True),
              'amp': FLAG, 'channels_last': FLAG, 'ema_decay': _real(0, 1, below_high=True),
              'eval_every': _int(1), 'checkpoint_every': _int(0), 'teacher': _text(),
              'teacher_checkpoints': ((lambda v: isinstance(v, list) and all(_text()[0](e) for e in v)),
                                      'a list of checkpoint paths'),
              'teacher_pretrained': FLAG, 'teacher_size': _int(1, optional=True)},
    'resolution': {'min_res': _int(32, optional=True), 'max_res': _int(32, optional=True),
                   'start_ramp': _int(0), 'end_ramp': _int(0), 'val_res': _int(1, optional=True)},
    'output': {'folder': _text()},
    'device': _text(optional=True),
}


def check(cfg: dict):
    """A ValueError naming the first setting of ``cfg`` that is wrong."""
    if not cfg['data']['train']:
        raise ValueError('data.train: no training .beton given')
    for section, rules in RULES.items():
        for name, (ok, what) in (rules.items() if isinstance(rules, dict) else [(None, rules)]):
            value = cfg[section][name] if name else cfg[section]
            if not ok(value):
                raise ValueError(f'{section}{"." + name if name else ""}={value!r}: must be {what}')
    from .models import known
    if not known(cfg['model']['arch']):
        raise ValueError(f"model.arch={cfg['model']['arch']!r}: not a timm architecture (timm.list_models() "
                         f"lists them) nor bundled:efficientnet_lite0")
    if cfg['train']['mode'] == 'kd':
        unknown = [n.strip() for n in cfg['train']['teacher'].split(',') if n.strip() and not known(n.strip())]
        if unknown:
            raise ValueError(f"train.teacher={cfg['train']['teacher']!r}: {unknown[0]!r} is not a timm "
                             f"architecture nor bundled:efficientnet_lite0")
    r = cfg['resolution']
    if (r['min_res'] is None) != (r['max_res'] is None):
        raise ValueError('resolution.min_res and resolution.max_res: give both (a ramp) or neither')
    if r['min_res'] is not None and not (r['min_res'] <= r['max_res'] and r['start_ramp'] <= r['end_ramp']):
        raise ValueError(f'resolution: min_res ({r["min_res"]}) must not exceed max_res ({r["max_res"]}), '
                         f'nor start_ramp ({r["start_ramp"]}) end_ramp ({r["end_ramp"]})')
