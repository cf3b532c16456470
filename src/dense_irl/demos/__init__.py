"""The two end-to-end demos on the synthetic task: ``online`` (``make demo``) and ``offline`` (``make demo-offline``)."""
