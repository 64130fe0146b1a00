"""peftjax.train.parse_config: --field=value flags, --help, --smoke keeps explicit flags."""

import dataclasses

import pytest

from peftjax import train


@dataclasses.dataclass(frozen=True)
class Config:
    """Fine-tune a tiny model."""

    rank: int = train.option(8, "LoRA rank of every adapted kernel.")
    lr: float = train.option(1e-3, "Peak learning rate of the schedule.")
    name: str = train.option("run a", "Name of the run, used in file names.")
    methods: tuple[str, ...] = train.option(("lora", "dora"), "Methods to compare.")
    sizes: tuple[int, int] = train.option((2, 3), "Batch and sequence length.")
    limit: int | None = train.option(None, "Stop after this many steps (none: never).")
    progress: bool = train.option(True, "Show a progress bar.")
    smoke: bool = train.option(False, "Tiny settings for a quick check.")


SMOKE = {"rank": 2, "lr": 0.5, "limit": 3}


def test_every_field_type_parses():
    cfg = train.parse_config(Config, [
        "--rank=4", "--lr=2.5e-4", "--name=x y", "--methods=lora,vera,", "--sizes=5,7",
        "--limit=12", "--progress=false"])
    assert cfg == Config(rank=4, lr=2.5e-4, name="x y", methods=("lora", "vera"),
                         sizes=(5, 7), limit=12, progress=False)
    assert isinstance(cfg.rank, int) and isinstance(cfg.lr, float)
    assert train.parse_config(Config, []) == Config()
    assert train.parse_config(Config, ["--limit=none"]).limit is None
    assert train.parse_config(Config, ["--limit="]).limit is None
    # a flag alone is true; yes/no/1/0 work too; dashes equal underscores
    assert train.parse_config(Config, ["--progress=no", "--progress"]).progress is True
    assert train.parse_config(Config, ["--progress=0"]).progress is False


def test_smoke_fills_only_the_fields_not_given():
    cfg = train.parse_config(Config, ["--smoke", "--rank=8"], smoke=SMOKE)
    # given explicitly and equal to its default: kept, not replaced by SMOKE's
    assert cfg.rank == 8 == Config.rank
    assert (cfg.lr, cfg.limit, cfg.smoke) == (0.5, 3, True)
    assert train.parse_config(Config, ["--smoke"], smoke=SMOKE) == Config(
        rank=2, lr=0.5, limit=3, smoke=True)
    # without --smoke (or with --smoke=false) the plain defaults
    assert train.parse_config(Config, ["--rank=8"], smoke=SMOKE) == Config()
    assert train.parse_config(Config, ["--smoke=false", "--rank=3"], smoke=SMOKE) == Config(
        rank=3)


def test_help_lists_every_field_with_default_smoke_value_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_config(Config, ["--rank=8", "--help"], smoke=SMOKE)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    assert "Fine-tune a tiny model." in out
    text = " ".join(out.split())  # help sentences are wrapped
    for f in dataclasses.fields(Config):
        assert f"--{f.name} (default: " in text, f.name
        assert f.metadata["help"] in text, f.name
    assert "--rank (default: 8; --smoke: 2)" in text
    assert "--name (default: 'run a')" in text
    assert "--methods (default: lora,dora)" in text
    assert "--progress (default: true)" in text
    assert train.config_help(Config, prog="x.py").splitlines()[0].startswith("usage: x.py")


@pytest.mark.parametrize("argv, message", [
    (["--rnak=3"], "unknown option --rnak"),
    (["rank=3"], "unexpected argument 'rank=3'"),
    (["--rank=3.5"], "--rank: cannot parse '3.5' as int"),
    (["--progress=maybe"], "--progress: expected true/false, got 'maybe'"),
    (["--sizes=1,2,3"], "--sizes: expected 2 comma-separated values"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(argv, message):
    with pytest.raises(SystemExit) as e:
        train.parse_config(Config, argv)
    assert message in str(e.value.code)


def test_bad_configuration_classes_and_smoke_settings_are_errors():
    @dataclasses.dataclass
    class Mutable:
        rank: int = 1

    @dataclasses.dataclass(frozen=True)
    class NoSmoke:
        rank: int = 1

    @dataclasses.dataclass(frozen=True)
    class Required:
        path: str
        smoke: bool = False

    with pytest.raises(TypeError, match="Mutable must be a frozen dataclass"):
        train.parse_config(Mutable, [])
    with pytest.raises(TypeError, match="must be a dataclass type"):
        train.parse_config(dict, [])
    with pytest.raises(ValueError, match=r"smoke settings \['rnak'\] are not fields of Config"):
        train.parse_config(Config, [], smoke={"rnak": 1})
    with pytest.raises(TypeError, match="NoSmoke has no `smoke: bool` field"):
        train.parse_config(NoSmoke, [], smoke={"rank": 2})
    with pytest.raises(SystemExit, match="missing required option"):
        train.parse_config(Required, [])
    assert train.parse_config(Required, ["--path=a"]) == Required(path="a")
    with pytest.raises(ValueError, match="needs a help sentence"):
        train.option(1, " ")
