"""The values a config field accepts, declared beside the field: a range or a list of choices, kept in the
dataclass field's metadata (OmegaConf's structured configs leave it alone), and the check of a loaded
config against them.

    batch: int = positive(256)
    dropout: Optional[float] = within("[0, 1)", None)   # None (not set) always passes
    precision: str = choice("no", "bf16", "fp16")       # the first choice is the default
"""
from dataclasses import field, fields, is_dataclass

from shards.errors import ConfigError

RANGE = "range"      # metadata: (predicate, what the value must be: the end of the error message)
CHOICES = "choices"  # metadata: the accepted values


def ranged(default, valid, what: str):
    """A field whose value, when set, satisfies `valid`; otherwise "<key>=<value>: must be <what>"."""
    return field(default=default, metadata={RANGE: (valid, what)})


def positive(default):
    return ranged(default, lambda x: x > 0, "positive")


def zero_or_more(default, zero: str = ""):
    """`zero` says what 0 means ("off"), for the message."""
    return ranged(default, lambda x: x >= 0, f"0 ({zero}) or more" if zero else "0 or more")


def at_least(low, default, why: str = ""):
    return ranged(default, lambda x: x >= low, f"at least {low}" + (f" ({why})" if why else ""))


def within(interval: str, default):
    """In an interval written as in mathematics: "[0, 1)" holds 0 and not 1."""
    lo, hi = (float(bound) for bound in interval[1:-1].split(","))
    low_ok = (lambda x: x >= lo) if interval[0] == "[" else (lambda x: x > lo)
    high_ok = (lambda x: x <= hi) if interval[-1] == "]" else (lambda x: x < hi)
    return ranged(default, lambda x: low_ok(x) and high_ok(x), f"in {interval}")


def choice(*allowed: str):
    """One of `allowed`, the first by default; otherwise "<key>: <value> is not <a | b | ...>"."""
    return field(default=allowed[0], metadata={CHOICES: allowed})


def check_values(spec, prefix: str = "") -> None:
    """Every field of a config section, its sub-sections and lists of them, against the range or choices
    declared beside it; the first value outside raises ConfigError naming its dotted key."""
    for f in fields(spec):
        key, value = prefix + f.name, getattr(spec, f.name)
        if is_dataclass(value):
            check_values(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    check_values(item, f"{key}.{i}.")
        elif RANGE in f.metadata:
            valid, what = f.metadata[RANGE]
            if value is not None and not valid(value):
                raise ConfigError(f"{key}={value}: must be {what}")
        elif CHOICES in f.metadata and value not in f.metadata[CHOICES]:
            choices = " | ".join(a or '""' for a in f.metadata[CHOICES])
            raise ConfigError(f"{key}: {value!r} is not {choices}")
