"""Ensembles of diffusion models: AFA (adaptive feature aggregation between N frozen U-Nets) and output
ensembles (averaged or keyword-routed noise predictions), with what each costs at inference.

- `aggregator`: the per-block Spatial-Aware Block-Wise aggregator (AFA §3.3).
- `unet`: `AFAUNet`, N U-Nets run block by block with aggregated features (Algorithm 1).
- `output`: `OutputEnsembleUNet` and `KeywordRouter`.
- `train`, `data`: training aggregators on the denoising loss (§3.4), data-parallel with accelerate.
- `io`: loading members (streamed, shared text encoder and VAE) and AFA folders (hash-checked).
- `pipeline`: pipelines with an ensemble U-Net, and sampling them; `cost`: parameters, time, memory.
"""
