-- Storage v2: buckets and file metadata. Objects live in the storage backend (local disk or S3)
-- under `<project_id>/<bucket id>/<name>`; this is the index of what is there.
--
-- Consistency between a row and its object (see src/storage/mod.rs):
-- * an upload reserves its row first (`size IS NULL`, `upload_token` set) and fills `size` only
--   once the object is stored, so a row without an object is never listed;
-- * a delete marks the row (`deleting_at`) before removing the object, and removes the row
--   after; a marked row is never listed and is finished by the next start-up sweep.
CREATE TABLE fluxbase.storage_buckets (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id         text NOT NULL REFERENCES fluxbase.projects (id) ON DELETE CASCADE,
    name               text NOT NULL CHECK (name ~ '^[a-z0-9_-]{1,63}$'),
    is_public          boolean NOT NULL DEFAULT false,
    max_file_size      bigint CHECK (max_file_size > 0),
    allowed_mime_types text[],
    created_at         timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

CREATE TABLE fluxbase.storage_files (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    project_id        text NOT NULL,
    bucket_id         uuid NOT NULL REFERENCES fluxbase.storage_buckets (id) ON DELETE CASCADE,
    name              text NOT NULL,
    s3_key            text NOT NULL UNIQUE,
    size              bigint,
    content_type      text NOT NULL DEFAULT 'application/octet-stream',
    upload_token      text,
    upload_started_at timestamptz,
    deleting_at       timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (bucket_id, name)
);
CREATE INDEX storage_files_project ON fluxbase.storage_files (project_id);
