"""Sealing shards: the writer's step that turns a shard's staged samples into its files.

Private helper of `cogfun.common.store`: `StoreWriter` (write.py) takes these methods from
`Sealing`, which relies on its `_group_arrays`, `_captions`, `_files`, `_first_shard`, `owns` and
`plan`. See shards.py for what a seal writes and in which order.
"""

from __future__ import annotations

from cogfun.common.store.shards import ShardFiles


class Sealing:
    """Seal one shard, or every shard a process owns that has staged samples."""

    def seal(self, bucket: str, shard: int) -> None:
        """Write bucket `bucket`'s shard `shard` (local number) whole from its staged samples and
        the still-valid samples of its previous version, checksum array last; then drop the
        staged files. Only the shard's owner may call this while other processes write."""
        self._group_arrays(bucket)
        self._seal(self._files[bucket], shard)

    def seal_captions(self, shard: int) -> None:
        self._captions()
        self._seal(self._files["\0captions"], shard)

    def _seal(self, files: dict[str, ShardFiles], shard: int) -> None:
        if self.guard is not None:
            self.guard()
        flags = files["checksum"]
        lo, hi = shard * flags.shard_rows, min((shard + 1) * flags.shard_rows, flags.rows)
        rows = range(lo, hi)
        staged = {int(r) for r in flags.staged_rows() if lo <= r < hi}
        sealed = flags.shard_values(shard)
        kept = {r for r in rows if sealed[r - lo] != 0 and r not in staged}
        for name, f in files.items():
            if name != "checksum":
                f.seal(shard, staged, kept)
        flags.seal(shard, staged, kept)
        # The staged done flags go first: a kill part way through leaves stray staged chunks
        # with no staged flag, and such a row is read (and sealed again) from its new shard.
        # The other order would leave a staged flag whose chunks are gone: read as zeros, and
        # a rerun would seal those zeros over the good copy.
        flags.unstage(rows)
        for name, f in files.items():
            if name != "checksum":
                f.unstage(rows)

    def seal_owned(self, rank: int, world: int) -> int:
        """Seal every shard process `rank` of `world` owns that has staged samples (the end of a
        process's encoding, and a resumed run's leftovers); returns how many were sealed."""
        sealed = 0
        for b in self.plan.buckets:
            self._group_arrays(b.name)
            for shard in self._staged_shards(self._files[b.name]):
                if self.owns(self._first_shard[b.name] + shard, rank, world):
                    self.seal(b.name, shard)
                    sealed += 1
        self._captions()
        for shard in self._staged_shards(self._files["\0captions"]):
            if self.owns(self._first_shard["\0captions"] + shard, rank, world):
                self.seal_captions(shard)
                sealed += 1
        return sealed

    @staticmethod
    def _staged_shards(files: dict[str, ShardFiles]) -> list[int]:
        """Shards with any staged file of any array: staged samples, and leftovers of a write
        or an unstaging that was killed part way (sealing drops them)."""
        shard_rows = files["checksum"].shard_rows
        return sorted(
            {int(r) // shard_rows for f in files.values() for r in f.staged_rows().tolist()}
        )
