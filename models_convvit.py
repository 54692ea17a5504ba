"""The encoders under the flat name the scripts and MAE's users know: `import models_convvit` gives the module
dmjd_encoders.models_convvit itself (one module, one timm registration), which an installed copy imports as
`import dmjd_encoders`."""
import sys

from dmjd_encoders import models_convvit

sys.modules[__name__] = models_convvit
