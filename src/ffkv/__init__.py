"""ffkv: what does each FFN memory of a causal LM store, and what does it do to the prediction?"""

__version__ = "0.1.0"

from .atlas import Atlas  # noqa: E402
from .corpus import load_corpus  # noqa: E402
from .errors import FfkvError  # noqa: E402
from .models import load_model  # noqa: E402
from .scan import ScanConfig, scan  # noqa: E402

__all__ = ["Atlas", "FfkvError", "ScanConfig", "load_corpus", "load_model", "scan", "__version__"]
