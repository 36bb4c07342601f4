-- A bucket's names in byte order (`COLLATE "C"`, whatever the database's collation): the names
-- inside a folder `a` are one range of it, from `a/` to `a0` ('0' follows '/'). An upload reads
-- that range to refuse a name that is already a folder (`a` when `a/b.txt` is stored: a name is
-- a file or a folder, not both; src/control/files.rs, `reserve_in_bucket`), and a listing's
-- pages (`ORDER BY name COLLATE "C"`) walk it instead of sorting the bucket's names.
CREATE INDEX storage_files_bucket_name_c ON fluxbase.storage_files (bucket_id, name COLLATE "C");
