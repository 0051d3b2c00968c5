"""Configuration: defaults, the shipped file, and errors that name key and file."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import tomllib

import pytest
from server import ROOT

from neurohttp import config

CONF = ROOT / "conf" / "neurohttp.toml"


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neurohttp", *args], capture_output=True,
                          text=True, timeout=30, cwd=cwd, env={"PYTHONPATH": str(ROOT),
                                                              "PATH": "/usr/bin:/bin"})


def test_shipped_config_lists_every_key_with_its_default():
    data = tomllib.loads(CONF.read_text())
    for section, keys in config.SCHEMA.items():
        assert section in data, f"[{section}] missing from {CONF}"
        for key, spec in keys.items():
            assert key in data[section], f"{section}.{key} missing from {CONF}"
            assert data[section][key] == spec.default, f"{section}.{key} differs from the default"
    for key in config.MODEL_KEYS["echo"]:
        assert key in data["models"]["echo"]


def test_every_key_has_a_comment():
    lines = CONF.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            j = i - 1
            while j >= 0 and re.match(r"^[a-z_]+ = ", lines[j]):
                j -= 1  # a group of related keys may share one comment
            assert lines[j].startswith("#"), f"no comment above {line!r}"


def test_shipped_config_equals_embedded_defaults():
    shipped = config.load(str(CONF))
    embedded = config.load(None)
    for section in config.SCHEMA:
        assert getattr(shipped, section).as_dict() == getattr(embedded, section).as_dict()
    assert shipped.models == embedded.models


def test_defaults():
    cfg = config.load(None)
    assert cfg.binds == [("127.0.0.1", 8080)]
    assert cfg.worker_count >= 1
    assert cfg.server.max_header_bytes == 16384
    assert cfg.server.max_body_bytes == 8 * 1024 * 1024
    assert cfg.server.header_timeout == 10 and cfg.server.keepalive_timeout == 5
    assert list(cfg.models) == ["echo"]


@pytest.mark.parametrize("text,needle", [
    ("[server]\nbogus = 1\n", "unknown key 'server.bogus'"),
    ("[nosuch]\nx = 1\n", "unknown section or key 'nosuch'"),
    ("[server]\nworkers = \"two\"\n", "server.workers must be an integer"),
    ("[server]\nworkers = -1\n", "server.workers must be >= 0"),
    ("[server]\nworkers = true\n", "server.workers must be an integer"),
    ("[server]\nbind = [\"127.0.0.1\"]\n", "server.bind"),
    ("[server]\nbind = [\"127.0.0.1:99999\"]\n", "port must be 0-65535"),
    ("[server]\nloop = \"fast\"\n", "server.loop must be one of"),
    ("[log]\nlevel = \"loud\"\n", "log.level must be one of"),
    ("[stats]\nallow = [\"not-a-net\"]\n", "stats.allow"),
    ("[models.m]\nprovider = \"nope\"\n", "models.m.provider: unknown provider"),
    ("[models.echo]\ntoken_delay = 3\n", "unknown key 'models.echo.token_delay'"),
    ("[server\n", "invalid TOML"),
])
def test_errors_name_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(path))
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_bind_forms():
    assert config.parse_bind("[::1]:8080") == ("::1", 8080)
    assert config.parse_bind(":9000") == ("0.0.0.0", 9000)
    assert config.parse_bind("localhost:80") == ("127.0.0.1", 80)
    with pytest.raises(ValueError):
        config.parse_bind("example.com:80")


def test_check_command(tmp_path):
    good = run_cli("check", "-c", str(CONF))
    assert good.returncode == 0 and "valid" in good.stdout
    assert run_cli("check").returncode == 0  # the embedded defaults
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nworkers = 2\nfrobnicate = true\n")
    r = run_cli("check", "-c", str(bad))
    assert r.returncode == 1
    assert "server.frobnicate" in r.stderr and str(bad) in r.stderr


def _numeric_keys() -> list[tuple[str, str, config.Key]]:
    """(table, key, spec) of every number in the schema and in every provider's
    model keys; a model key lives in a [models.m] table with its provider."""
    out = [(f"[{section}]", k, spec) for section, keys in config.SCHEMA.items()
           for k, spec in keys.items() if spec.numeric]
    out += [(f'[models.m]\nprovider = "{provider}"', k, spec)
            for provider, keys in config.MODEL_KEYS.items()
            for k, spec in keys.items() if spec.numeric]
    return out


def test_every_numeric_key_rejects_non_finite_and_out_of_range_values(tmp_path):
    """TOML has inf and nan: every number must be finite and inside its range
    (an infinite worker_timeout crashed the master on reload, an infinite
    token_delay_ms hung that model's requests)."""
    keys = _numeric_keys()
    assert len(keys) >= 20
    path = tmp_path / "bad.toml"
    for table, key, spec in keys:
        name = table.split("]")[0].strip("[") + "." + key
        lo, hi = spec.bounds
        assert lo < hi and all(map(math.isfinite, (lo, hi))), name
        bad = ["inf", "-inf", "nan", repr(int(hi) + 1), repr(int(lo) - 1)]
        if spec.type is int:
            bad = bad[3:]  # inf and nan are floats: refused as "must be an integer"
        for value in bad:
            path.write_text(f"{table}\n{key} = {value}\n")
            with pytest.raises(config.ConfigError) as e:
                config.load(str(path))
            assert name in str(e.value) and str(path) in str(e.value), (value, e.value)
        path.write_text(f"{table}\n{key} = {int(hi)!r}\n")
        config.load(str(path))  # its upper bound itself is accepted
    # the server's own keys and the echo model's each have a range of their own
    without = [k for table, k, spec in keys
               if ("provider" not in table or '"echo"' in table) and spec.range is None]
    assert not without


@pytest.mark.parametrize("text,needle", [
    ("[server]\nworker_timeout = inf\n", "server.worker_timeout must be a finite number"),
    ("[server]\ngraceful_timeout = nan\n", "server.graceful_timeout must be a finite number"),
    ("[server]\nworker_timeout = 0.1\n", "server.worker_timeout must be between 1 and 3600"),
    ("[server]\nworkers = 100000\n", "server.workers must be between 0 and 1024"),
    ("[models.echo]\ntoken_delay_ms = inf\n", "models.echo.token_delay_ms must be a finite"),
    ("[models.slow]\nprovider = \"echo\"\ntoken_delay_ms = 1e12\n",
     "models.slow.token_delay_ms must be between 0 and 60000"),
])
def test_check_and_start_refuse_non_finite_and_out_of_range_values(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text + "[log]\nlevel = \"info\"\n")
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 1, r.stdout
    assert needle in r.stderr and str(path) in r.stderr, r.stderr
    r = run_cli("start", "-c", str(path), "-b", "127.0.0.1:0", "--pid-file",
                str(tmp_path / "p.pid"), cwd=tmp_path)
    assert r.returncode == 1
    assert needle in r.stderr and str(path) in r.stderr, r.stderr
    assert not (tmp_path / "p.pid").exists()


def test_section_dataclasses_mirror_the_schema():
    """The schema holds every key's type, default, check and range; each
    section's dataclass gives the type checker the same keys with the same
    types (a key added to one and not the other fails here, and at load)."""
    import typing
    expected = {int: int, config.NUM: float, str: str, bool: bool, list: list[str]}
    assert list(config.SECTIONS) == list(config.SCHEMA)
    for name, cls in config.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        # [plugins.<name>] tables, [[auth.keys]] tables
        extra = {"plugins": {"options"}, "auth": {"keys"}}.get(name, set())
        assert set(hints) - extra == set(config.SCHEMA[name]), name
        for key, spec in config.SCHEMA[name].items():
            assert hints[key] == expected[spec.type], f"{name}.{key}: {hints[key]} vs {spec.type}"
    cfg = config.load(None)
    for name in config.SCHEMA:
        section = getattr(cfg, name)
        assert isinstance(section, config.SECTIONS[name])
        for key, spec in config.SCHEMA[name].items():
            value = getattr(section, key)
            want = expected[spec.type]
            assert value == spec.default and isinstance(value, typing.get_origin(want) or want)


def test_sections_are_read_only(tmp_path):
    cfg = config.load(None)
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.workers = 3  # type: ignore[misc]
    path = tmp_path / "n.toml"
    path.write_text("[server]\nheader_timeout = 3\n")
    assert config.load(str(path)).server.header_timeout == 3.0
    assert isinstance(config.load(str(path)).server.header_timeout, float)
