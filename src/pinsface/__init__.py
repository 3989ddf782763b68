"""pinsface: offline face identification on folder-per-person photo collections."""

__version__ = "0.1.0"
