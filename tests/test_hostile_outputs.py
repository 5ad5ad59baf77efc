"""Issue 13, output side: --force replaces only regular files and never an input of the same command (item 2);
a read-only output location is a clean error, and "not enough disk space" means space (item 6); temp files
of dead writers are removed by the next write to the path, with a note (item 8)."""
import errno
import os
import shutil
import stat
import subprocess
import sys

import pytest

from dgguf.cli import main
from dgguf.format import gguf_file

CONTROL = [chr(c) for c in range(32)] + ["\x7f"]


@pytest.fixture
def hf(checkpoints, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(checkpoints("tiny"), d)
    return d


@pytest.fixture(scope="module")
def small_gguf(checkpoints, tmp_path_factory):
    from dgguf.convert.quantize import convert_checkpoint
    return convert_checkpoint(checkpoints("tiny"), tmp_path_factory.mktemp("in") / "in.gguf", "Q8_0")


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_error(capsys, *argv):
    code, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not any(c in lines[0] for c in CONTROL)
    return lines[0]


def no_partials(d):
    return [p.name for p in d.iterdir() if ".partial-" in p.name] == []


# ----------------------------------------------------------------------------- item 2: what --force replaces

@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_fifo_output_is_refused(capsys, tmp_path, hf, force):
    out = tmp_path / "fifo"
    os.mkfifo(out)
    line = one_error(capsys, "convert", str(hf), "-o", str(out), "--type", "Q8_0", "-q", *force)
    assert "a FIFO" in line and "regular file" in line
    assert stat.S_ISFIFO(os.lstat(out).st_mode)
    assert no_partials(tmp_path)


def test_device_node_output_is_refused(capsys, tmp_path, hf, small_gguf):
    """The issue's reproducer: mknod x c 1 3 (a /dev/null twin); convert and quantize with --force."""
    out = tmp_path / "x"
    try:
        os.mknod(out, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except OSError as e:
        pytest.skip(f"cannot make a device node here: {e}")
    line = one_error(capsys, "convert", str(hf), "-o", str(out), "--type", "Q8_0", "-q", "--force")
    assert "a character device" in line
    line = one_error(capsys, "quantize", str(small_gguf), str(out), "Q4_0", "-q", "--force")
    assert "a character device" in line
    assert stat.S_ISCHR(os.lstat(out).st_mode)
    assert no_partials(tmp_path)


def test_directory_output_is_refused(capsys, tmp_path, hf):
    out = tmp_path / "dir"
    out.mkdir()
    line = one_error(capsys, "convert", str(hf), "-o", str(out), "-q", "--force")
    assert "a directory" in line
    assert out.is_dir() and list(out.iterdir()) == []


@pytest.mark.parametrize("target", ["fifo", "dir"])
def test_symlink_to_a_fifo_or_directory_is_refused(capsys, tmp_path, hf, target):
    t = tmp_path / target
    os.mkfifo(t) if target == "fifo" else t.mkdir()
    out = tmp_path / "link"
    out.symlink_to(t)
    line = one_error(capsys, "convert", str(hf), "-o", str(out), "-q", "--force")
    assert "through a symbolic link" in line
    assert out.is_symlink() and os.readlink(out) == str(t)


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"])
def test_convert_never_replaces_its_own_input_files(capsys, tmp_path, hf, victim):
    before = snapshot(hf)
    line = one_error(capsys, "convert", str(hf), "-o", str(hf / victim), "--type", "Q8_0", "-q", "--force")
    assert "input file" in line
    assert snapshot(hf) == before


@pytest.mark.parametrize("how", ["hardlink", "symlink"])
def test_convert_input_reached_through_a_link_is_refused(capsys, tmp_path, hf, how):
    before = snapshot(hf)
    out = tmp_path / "out.gguf"
    if how == "hardlink":
        os.link(hf / "model.safetensors", out)
    else:
        out.symlink_to(hf / "config.json")
    line = one_error(capsys, "convert", str(hf), "-o", str(out), "-q", "--force")
    assert "input file" in line and "through a link" in line
    assert snapshot(hf) == before


def test_convert_never_replaces_a_shard(capsys, tmp_path, checkpoints):
    d = tmp_path / "sharded"
    shutil.copytree(checkpoints("tiny", shards=3), d)
    before = snapshot(d)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    assert "input file" in one_error(capsys, "convert", str(d), "-o", str(victim), "-q", "--force")
    assert "input file" in one_error(capsys, "convert", str(d), "-o", str(d / "model.safetensors.index.json"),
                                     "-q", "--force")
    assert snapshot(d) == before


@pytest.mark.parametrize("how", ["same", "hardlink", "symlink"])
def test_quantize_never_replaces_its_input(capsys, tmp_path, small_gguf, how):
    src = tmp_path / "in.gguf"
    shutil.copy(small_gguf, src)
    data = src.read_bytes()
    out = src if how == "same" else tmp_path / "out.gguf"
    if how == "hardlink":
        os.link(src, out)
    elif how == "symlink":
        out.symlink_to(src)
    line = one_error(capsys, "quantize", str(src), str(out), "Q4_0", "--force", "-q")
    assert "input file" in line
    assert src.read_bytes() == data
    assert no_partials(tmp_path)


def test_force_replaces_a_symlink_to_a_regular_file_not_its_target(capsys, tmp_path, hf):
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep me")
    out = tmp_path / "out.gguf"
    out.symlink_to(target)
    code, err = cli(capsys, "convert", str(hf), "-o", str(out), "-q", "--force")
    assert code == 0, err
    assert not out.is_symlink() and out.read_bytes()[:4] == b"GGUF"
    assert target.read_bytes() == b"keep me"


def test_dangling_symlink_needs_force_like_a_file(capsys, tmp_path, hf):
    out = tmp_path / "out.gguf"
    out.symlink_to(tmp_path / "nowhere")
    assert "exists" in one_error(capsys, "convert", str(hf), "-o", str(out), "-q")
    code, err = cli(capsys, "convert", str(hf), "-o", str(out), "-q", "--force")
    assert code == 0, err
    assert not (tmp_path / "nowhere").exists() and out.read_bytes()[:4] == b"GGUF"


def test_planted_symlink_at_the_temp_name_is_not_followed(capsys, tmp_path, hf):
    """A link planted at this process's temp name (for instance by another user) is never written through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    planted = tmp_path / f".out.gguf.partial-{os.getpid()}"
    planted.symlink_to(victim)
    code, err = cli(capsys, "convert", str(hf), "-o", str(tmp_path / "out.gguf"), "-q")
    assert code == 0, err
    assert victim.read_bytes() == b"precious"
    assert (tmp_path / "out.gguf").read_bytes()[:4] == b"GGUF"


# -------------------------------------------------------------------------- item 6: read-only file systems

def _erofs(*a, **k):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def test_read_only_output_directory_is_one_clean_error(capsys, tmp_path, hf, monkeypatch):
    monkeypatch.setattr(gguf_file, "open", _erofs, raising=False)
    monkeypatch.setattr(os, "unlink", _erofs)          # and the clean-up fails the same way
    line = one_error(capsys, "convert", str(hf), "-o", str(tmp_path / "out.gguf"), "-q")
    assert "Read-only file system" in line and "disk space" not in line
    assert not (tmp_path / "out.gguf").exists()


def test_small_read_only_file_system_is_not_reported_as_full(capsys, tmp_path, hf, monkeypatch):
    monkeypatch.setattr(gguf_file, "_disk_free", lambda d: 1000)
    monkeypatch.setattr(gguf_file, "open", _erofs, raising=False)
    line = one_error(capsys, "convert", str(hf), "-o", str(tmp_path / "out.gguf"), "-q")
    assert "Read-only file system" in line and "disk space" not in line


def test_failed_clean_up_does_not_hide_the_write_error(capsys, tmp_path, hf, monkeypatch):
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += memoryview(b).nbytes
            if self.n > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

    monkeypatch.setattr(gguf_file, "open", lambda p, m="r": Full(real_open(p, m)), raising=False)
    monkeypatch.setattr(os, "unlink", _erofs)
    line = one_error(capsys, "convert", str(hf), "-o", str(tmp_path / "out.gguf"), "-q")
    assert "No space left on device" in line and "Read-only" not in line
    monkeypatch.undo()
    # the temp file the failed clean-up left is removed by the next write to that path
    assert not no_partials(tmp_path)
    code, err = cli(capsys, "convert", str(hf), "-o", str(tmp_path / "out.gguf"), "-q")
    assert code == 0 and err.count("note: removed") == 1, err
    assert no_partials(tmp_path)


@pytest.fixture
def read_only_mount(tmp_path):
    """A real 1 MiB read-only tmpfs (root only; skipped where mounting is not allowed)."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a read-only tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_real_small_read_only_file_system(capsys, hf, read_only_mount):
    line = one_error(capsys, "convert", str(hf), "-o", str(read_only_mount / "out.gguf"), "-q")
    assert "Read-only file system" in line and "disk space" not in line


# ------------------------------------------------------------------------------ item 8: stale temp files

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_partial_of_a_dead_process_is_removed_with_a_note(capsys, tmp_path, hf):
    stale = tmp_path / f".out.gguf.partial-{dead_pid()}"
    stale.write_bytes(b"\0" * 4096)
    live = tmp_path / f".out.gguf.partial-{os.getppid()}"       # a writer that still runs: left alone
    live.write_bytes(b"\0" * 16)
    other = tmp_path / ".other.gguf.partial-1234567"            # another output's: not ours to judge
    other.write_bytes(b"")
    code, err = cli(capsys, "convert", str(hf), "-o", str(tmp_path / "out.gguf"), "-q")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("note: removed ") and str(stale) in lines[0], err
    assert not stale.exists() and live.exists() and other.exists()


def test_killed_conversion_leftover_is_removed_by_the_next_run(capsys, tmp_path, hf):
    out = tmp_path / "out.gguf"
    script = (
        "import os, signal\n"
        "from dgguf.convert import quantize\n"
        "real = quantize.encode\n"
        "n = [0]\n"
        "def enc(x, t):\n"
        "    n[0] += 1\n"
        "    if n[0] == 30: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(x, t)\n"
        "quantize.encode = enc\n"
        f"quantize.convert_checkpoint({str(hf)!r}, {str(out)!r}, threads=1)\n")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == -9
    (leftover,) = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    code, err = cli(capsys, "convert", str(hf), "-o", str(out), "-q")
    assert code == 0 and "note: removed" in err and leftover.name in err, err
    assert no_partials(tmp_path) and out.read_bytes()[:4] == b"GGUF"


def test_a_stale_partial_is_removed_even_when_the_run_fails(capsys, tmp_path, hf, monkeypatch):
    stale = tmp_path / f".out.gguf.partial-{dead_pid()}"
    stale.write_bytes(b"x")
    monkeypatch.setattr(gguf_file, "_disk_free", lambda d: 1000)
    code, err = cli(capsys, "convert", str(hf), "-o", str(tmp_path / "out.gguf"), "-q")
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("note: removed") and lines[1].startswith("error: ")
    assert "disk space" in lines[1] and no_partials(tmp_path)


def test_windows_replacing_a_held_output_retries_then_says_what_holds_it(capsys, tmp_path, hf, monkeypatch):
    """Windows refuses os.replace onto a file another process (or a loaded model) holds open or mapped: the writer
    retries for about a second (a virus scanner lets go), then one clean error naming the file; nothing left over."""
    real, calls = os.replace, []

    def held(src, dst, fails):
        calls.append(dst)
        if len(calls) <= fails:
            raise PermissionError(13, "Access is denied")
        real(src, dst)
    monkeypatch.setattr(gguf_file, "_WINDOWS", True)
    monkeypatch.setattr(gguf_file.time, "sleep", lambda s: None)
    out = tmp_path / "out.gguf"
    monkeypatch.setattr(gguf_file.os, "replace", lambda s, d: held(s, d, 3))
    code, err = cli(capsys, "convert", str(hf), "-o", str(out), "--type", "Q8_0", "-q")
    assert code == 0 and len(calls) == 4 and out.read_bytes()[:4] == b"GGUF"
    calls.clear()
    monkeypatch.setattr(gguf_file.os, "replace", lambda s, d: held(s, d, 100))
    code, err = cli(capsys, "convert", str(hf), "-o", str(out), "--type", "Q8_0", "-q", "--force")
    assert code == 2 and len(calls) == len(gguf_file._REPLACE_TRIES) + 1
    assert f"{out}: cannot replace it" in err and "has it open or mapped" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out.gguf"]
