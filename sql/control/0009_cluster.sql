-- Cluster mode (FLUXBASE_NATS_URL): what the nodes sharing this control database share.

-- The instance secret every node uses (project role passwords, realtime tokens, signed URLs,
-- message tags are derived from it): the first node of a cluster stores its own, the others
-- adopt it. Single-node servers never read it.
CREATE TABLE fluxbase.cluster_secret (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    instance_secret text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON fluxbase.cluster_secret FROM PUBLIC;

-- Which node drains a webhook's deliveries now (cluster mode): a lease, so that two nodes
-- never send the same first attempt; a node that dies loses it when it expires.
ALTER TABLE fluxbase.webhooks
    ADD COLUMN drain_node text,
    ADD COLUMN drain_until timestamptz;
