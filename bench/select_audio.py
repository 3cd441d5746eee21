"""Configuration selection for bench/quality_audio.py without the test speaker (theo).

Pretrains each configuration (recipe overrides, one quoted argument each) on the 1,500 non-theo
files of FSDD-dev, then fits linear and kNN probes on two of george / jackson / nicolas and scores
them on the third, rotating; theo is never read. ``RANDOM`` (plus overrides) scores the encoder at
random init. One torch thread; the pretraining runs in a subprocess, checkpoints are probed after.

    ls ../shared/data/audio/fsdd-dev/*.wav | grep -v _theo_ > /tmp/abench2/pretrain.txt
    PYTHONPATH=. .venv/bin/python bench/select_audio.py 600 300 RANDOM "" "loss.regularizer_weight=4.0"

(WORK, RECIPE below: scratch folder and recipe; this is the script that produced the validation
table in docs/results.md, with those two paths made constants.)
"""
WORK = '/tmp/abench2'
RECIPE = str(__import__('pathlib').Path(__file__).resolve().parent.parent / 'recipes/audio.yaml')
import sys, json, shutil, subprocess, time, numpy as np, torch
from pathlib import Path
torch.set_num_threads(1)
from multijepa.embed import load, Embedder
from multijepa.recipe import load_recipe
from multijepa.evaluate import linear_probe_accuracy, knn_accuracy
files = [l.strip() for l in open(f'{WORK}/pretrain.txt')]
digits = np.array([int(Path(f).name.split('_')[0]) for f in files]); spk = np.array([Path(f).name.split('_')[1] for f in files])
SPK = ['george', 'jackson', 'nicolas']
LOG = f'{WORK}/val.log'
def score(feats):
    lin, knn = [], []
    for s in SPK:
        te = np.flatnonzero(spk == s); tr = np.flatnonzero(spk != s)
        lin.append(round(linear_probe_accuracy(feats[tr], digits[tr], feats[te], digits[te]), 3))
        knn.append(round(knn_accuracy(feats[tr], digits[tr], feats[te], digits[te]), 3))
    return lin, knn
def log(line):
    print(line, flush=True)
    with open(LOG, 'a') as fh: fh.write(line + '\n')
steps, every = int(sys.argv[1]), int(sys.argv[2])
for ov in sys.argv[3:]:
    name = (ov.replace(' ', '_').replace('/', '') or 'default')[:100]
    out = Path(WORK) / 'runs' / name
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = ['audio.sample_rate=8000', f'data.path={WORK}/pretrain.txt', 'train.progress=false', 'train.threads=1',
            'data.num_workers=0', f'train.steps={steps}', f'train.checkpoint_every={every}', 'train.log_every=50',
            f'run.dir={out}', 'run.resume=false'] + ov.split()
    if ov.startswith('RANDOM'):
        rec = load_recipe(RECIPE, base[:1] + ov.split()[1:])
        lin, knn = score(Embedder.random_init(rec, device='cpu').embed(files, batch_size=128))
        log(f'{ov} | random init | lin {lin} mean {np.mean(lin):.3f} | knn {knn} mean {np.mean(knn):.3f}')
        continue
    code = ("import torch; torch.set_num_threads(1)\nfrom multijepa.recipe import load_recipe\nfrom multijepa.train import pretrain\n"
            f"pretrain(load_recipe({RECIPE!r}, {base!r}))")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=open(f'{out}.out', 'w'), stderr=subprocess.STDOUT)
    seen, copies = None, []
    while True:
        done = proc.poll() is not None
        ck = out / 'last.pt'
        if ck.exists() and ck.stat().st_mtime != seen:
            time.sleep(1); seen = ck.stat().st_mtime
            step = torch.load(ck, weights_only=True, map_location='cpu')['step']
            if step not in [s for s, _ in copies]:
                dst = Path(f'{out}__{step}.pt'); shutil.copy(ck, dst); copies.append((step, dst))
        if done: break
        time.sleep(3)
    tmin = (time.time() - t0) / 60
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    for step, ck in copies:
        lin, knn = score(load(ck, device='cpu').embed(files, batch_size=128))
        er = [r['target_erank'] for r in rows if r['step'] == step]
        log(f'{ov or "default"} | step {step}/{steps} ({tmin:.1f} min) | lin {lin} mean {np.mean(lin):.3f} | knn {knn} mean {np.mean(knn):.3f} | erank {er[0] if er else None:.1f}')
