"""The small set of exceptions medvit raises for problems a person can fix.

Every subclass of `MedvitError` carries a message a clinician or researcher can act on.
The CLI turns them into one line and exit code 2; the app turns them into `st.error`.
Anything else escaping the library is a bug.
"""


class MedvitError(Exception):
    """Base class: a user-actionable problem (bad input, bad config, missing files)."""


class ImageReadError(MedvitError):
    """The file cannot be read as an image: empty, truncated, corrupt or not an image at all."""


class UnsupportedImageError(MedvitError):
    """The file is a valid image but not one medvit handles (CT/MR, multi-frame, no pixels, lateral...)."""


class MissingDecoderError(ImageReadError):
    """The pixel data uses a transfer syntax no installed pydicom plugin can decode."""


class ImageTooLargeError(UnsupportedImageError):
    """The image (or the size its header claims) exceeds the pixel or byte limit."""


class DatasetError(MedvitError):
    """A labels CSV or image folder is malformed, inconsistent or incomplete."""


class ConfigError(MedvitError):
    """A YAML config or override is invalid."""


class CheckpointError(MedvitError):
    """A run folder or weights file is missing, incomplete, or in a refused format (pickle)."""


class WeightsNotFoundError(CheckpointError):
    """Pretrained weights are not available offline; the message says what to download and where."""


class NonFiniteLossError(MedvitError):
    """Training loss became NaN/Inf; the run stops and the last good checkpoint in the run folder is kept."""


class PacsError(MedvitError):
    """The PACS (DICOMweb server) cannot be reached or refuses the credentials: nothing can be done until it answers."""


class PacsRequestError(PacsError):
    """The PACS answered one request with an error (an instance gone, a store rejected): only that instance fails."""
