"""The sparse autoencoder.

Forward pass, with u = x - b_dec:

    pre   = LN(u) @ W_enc + b_enc          (LN only when cfg.layer_norm; plain u otherwise)
    z     = ReLU(pre)                      ("relu")
          | ReLU of the k largest entries of pre, 0 elsewhere   ("topk")
    x_hat = z @ W_dec + b_dec

LN is a LayerNorm with no affine parameters, (u - mean(u)) / sqrt(var(u) + 1e-5) over the d_in
features: the affine scale and shift would be redundant with W_enc and b_enc. Subtracting b_dec
first (SAELens's apply_b_dec_to_input) lets b_dec, initialised at the data mean, centre the data.
Rows of W_dec have unit norm; ConstrainedAdam keeps them there.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from csc.errors import CacheError, CscError
from csc.sae.config import SaeConfig

LN_EPS = 1e-5
WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "sae_config.json"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SaeConfig, *, seed: int = 0, device: torch.device | str = "cpu"):
        super().__init__()
        if cfg.d_in is None:
            raise CscError("SaeConfig.d_in is unset: set it to the d_model of the activations")
        self.cfg = cfg
        # A private generator: building a model must not move torch's global RNG.
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w_dec = torch.randn(cfg.dict_size, cfg.d_in, generator=gen)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.W_enc = nn.Parameter(w_dec.T.clone().to(device))
        self.b_enc = nn.Parameter(torch.zeros(cfg.dict_size, device=device))
        self.W_dec = nn.Parameter(w_dec.to(device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))
        self.check_not_degenerate()

    def check_not_degenerate(self) -> None:
        """Refuse weights that cannot be a trained or trainable SAE (all zero, NaN or inf)."""
        for name in PARAM_NAMES:
            p = getattr(self, name)
            if not torch.isfinite(p).all():
                raise CscError(f"SAE parameter {name} contains NaN or inf")
        for name in ("W_enc", "W_dec"):
            if not getattr(self, name).any():
                raise CscError(
                    f"SAE parameter {name} is all zero: every code and reconstruction would be "
                    "constant, so no metric of this SAE means anything"
                )

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        """Set b_dec to the mean of a [N, d_in] sample of training activations."""
        self.b_dec.copy_(sample.float().mean(dim=0).to(self.b_dec))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        u = x - self.b_dec
        if self.cfg.layer_norm:
            u = F.layer_norm(u, (self.cfg.d_in,), eps=LN_EPS)
        return u @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "relu":
            return F.relu(pre)
        values, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: getattr(self, n).detach().cpu().contiguous() for n in PARAM_NAMES},
                  str(path / WEIGHTS_FILE))
        (path / CONFIG_FILE).write_text(self.cfg.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "SparseAutoencoder":
        path = Path(path)
        if not (path / WEIGHTS_FILE).is_file() or not (path / CONFIG_FILE).is_file():
            raise CacheError(f"{path} is not a saved SAE (needs {WEIGHTS_FILE} and {CONFIG_FILE})")
        cfg = SaeConfig.model_validate(json.loads((path / CONFIG_FILE).read_text()))
        return cls.from_tensors(cfg, load_file(str(path / WEIGHTS_FILE)), device, source=str(path))

    @classmethod
    def from_tensors(cls, cfg: SaeConfig, tensors: dict[str, torch.Tensor],
                     device: torch.device | str = "cpu", source: str = "tensors") -> "SparseAutoencoder":
        """Build an SAE holding exactly these weights; checks names, shapes and degeneracy."""
        sae = cls(cfg, device=device)
        for name in PARAM_NAMES:
            p = getattr(sae, name)
            if name not in tensors:
                raise CacheError(f"{source}: missing SAE tensor {name}")
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise CacheError(f"{source}: {name} has shape {tuple(t.shape)}, config implies {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t.to(p))
        sae.check_not_degenerate()
        return sae
