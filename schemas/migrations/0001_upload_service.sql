-- The upload service's own tables (sprue internal/migrations/sql/00001_init.sql), created
-- only when absent so that a database already owned by the upload service is left as it is.

CREATE TABLE IF NOT EXISTS public.customer (
    customer          TEXT PRIMARY KEY,
    external_account  TEXT NULL,
    product           TEXT NOT NULL,
    details           JSONB NULL,
    reserved_capacity BIGINT NULL,
    inserted_at       TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NULL
);

CREATE INDEX IF NOT EXISTS customer_external_account_idx
    ON public.customer (external_account) WHERE external_account IS NOT NULL;

CREATE TABLE IF NOT EXISTS public.subscription (
    subscription TEXT NOT NULL,
    provider     TEXT NOT NULL,
    customer     TEXT NOT NULL,
    cause        TEXT NULL,
    inserted_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (subscription, provider)
);

CREATE INDEX IF NOT EXISTS subscription_customer_provider_subscription_idx
    ON public.subscription (customer, provider, subscription);

CREATE TABLE IF NOT EXISTS public.consumer (
    subscription TEXT NOT NULL,
    provider     TEXT NOT NULL,
    consumer     TEXT NOT NULL,
    customer     TEXT NOT NULL,
    cause        TEXT NULL,
    inserted_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (subscription, provider)
);

CREATE INDEX IF NOT EXISTS consumer_consumer_provider_subscription_idx
    ON public.consumer (consumer, provider, subscription);

CREATE INDEX IF NOT EXISTS consumer_customer_subscription_provider_idx
    ON public.consumer (customer, subscription, provider);
