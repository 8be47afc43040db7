"""Read, check and report a saved batch of values, old values, returns and masks (``valueloss inspect``).

The numbers come from :mod:`valueloss.functional`; ``.safetensors`` files need the ``[io]`` extra.
"""
