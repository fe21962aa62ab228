"""The admin layer: offline tools over a store, behind `slabcache` commands.

``fsck``      check and repair (report by default, fix when asked)
``compact``   shrink, grow, re-slot
``reports``   stats and listings (read-only peeks)
``common``    opening a possibly damaged index; who has a store open
``progress``  the one progress bar
"""
