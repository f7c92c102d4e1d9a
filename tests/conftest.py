import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import mlx_diffusion  # noqa: E402,F401  must come before any `import mlx.core` so the fast BLAS is interposed
