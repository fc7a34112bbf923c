"""Pre-copy live migration over TCP (``lcr migrate`` / ``lcr receive``).

protocol.py: the framed, checksummed, authenticated connection;
skeleton.py: the destination's early tree and its reconciliation with the
final image.  The order of things is in engine/migrate.py.
"""
