-- An upload's reservation carries what its file will be once moved into place (size, type) and
-- where its bytes were staged. The reservation is committed durably before the move; the row's
-- final update (listing the file) then need not wait for its WAL flush: after a crash, the
-- start-up sweep finishes a reservation whose staged object is gone and whose object is at its
-- key with the reserved size (storage::sweep).
ALTER TABLE fluxbase.storage_files
    ADD COLUMN upload_size bigint,
    ADD COLUMN upload_content_type text,
    ADD COLUMN upload_staged text;
