-- Workflows defined as data (docs/contract.md §8): each version of a definition, as stored
-- by PUT /v1/workflow-definitions/{name}. Versions are assigned by content: a body whose
-- content hash equals the newest version's is that version. Secrets are never here: a
-- definition names the environment variables that hold them.
CREATE TABLE workflow_definitions (
    name         text        NOT NULL,
    version      integer     NOT NULL CHECK (version >= 1),
    content_hash text        NOT NULL,
    definition   jsonb       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- Which recorded plans are of defined workflows: an unfinished run of one whose definition
-- row is gone can never run again (`sagaflow check` reports it).
ALTER TABLE workflow_plans ADD COLUMN defined boolean NOT NULL DEFAULT false;
