-- packets loses its foreign key to calls. Checking it cost a lookup of the call (with a
-- KEY SHARE lock) for every inserted packet, the largest part of the packet INSERT under load
-- (docs/benchmarks.md), and it guarded nothing the writer does not already guarantee: a
-- packet batch locks (or creates) each of its calls, in the same transaction, before it
-- inserts their packets. No code deletes calls; when retention does (issue 15) it removes a
-- call's packets explicitly, as the partitioned packets table of that issue needs anyway.
--
-- Safe while the previous release runs: dropping a constraint only allows more, and takes
-- its ACCESS EXCLUSIVE lock for an instant (no scan).
ALTER TABLE packets DROP CONSTRAINT IF EXISTS packets_call_id_fkey;
