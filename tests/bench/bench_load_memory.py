"""CPU benchmark: how much RAM loading a model costs, relative to the model's own size.

Writes a ~190 M-parameter model (tiny vision/motion branches, a 12-layer Qwen2 of width 1024) once in
both formats (our single-file directory, and the official layout in 100 MiB shards), then loads each in a
fresh process and reports the resident-set growth and the peak (`ru_maxrss`) over the load, in MiB.
Loading fills an empty model tensor by tensor, so the peak should stay near 1x the model, not 2x.

    python tests/bench/bench_load_memory.py [WORKDIR]
"""

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _rss_mib():
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024


def write_models(workdir: Path):
    from vqa2cli.checkpoint import save_model_dir, save_official
    from vqa2cli.config import TextConfig, tiny_config
    from vqa2cli.modeling import VQA2Model
    from vqa2cli.tokenizer import build_tokenizer

    text = TextConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    model = VQA2Model(tiny_config(text=text)).eval()
    tokenizer = build_tokenizer()
    save_model_dir(model, tokenizer, workdir / "ours")
    save_official(model, tokenizer, workdir / "official", max_shard_bytes=100 * 2**20)


def measure(path: str):
    # Import everything first so that only the load itself is measured.
    import transformers  # noqa: F401

    from vqa2cli import modeling  # noqa: F401
    from vqa2cli.pipeline import load_model

    before = _rss_mib()
    model = load_model(path, device="cpu")
    size = sum(p.numel() * p.element_size() for p in model.model.parameters()) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{Path(path).name}: model {size:.0f} MiB; RSS +{_rss_mib() - before:.0f} MiB after loading, "
          f"peak +{peak - before:.0f} MiB during it")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        measure(sys.argv[2])
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp)
        write_models(workdir)
        for name in ("ours", "official"):
            subprocess.run([sys.executable, __file__, "--measure", str(workdir / name)], check=True)


if __name__ == "__main__":
    main()
