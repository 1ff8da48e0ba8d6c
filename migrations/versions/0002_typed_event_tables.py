"""Typed tables for the 55 event types with a payload schema.

Stored events get their typed rows from `raw` after the upgrade (REBUILD_TYPED).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# store.upgrade re-derives typed rows from `raw` once the upgrade is done.
REBUILD_TYPED = True


def upgrade() -> None:
    op.create_table(
        "api_key_event_scopes",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id", "position"),
    )
    op.create_table(
        "api_key_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("api_key_id", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "certificate_event_certificates",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("certificate_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id", "position"),
    )
    op.create_table(
        "certificate_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("certificate_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("certificate", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "checkpoint_permission_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("checkpoint_permission_id", sa.Text(), nullable=True),
        sa.Column("project_id", sa.Text(), nullable=True),
        sa.Column("fine_tuned_model_checkpoint", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "external_key_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("external_key_id", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "group_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("group_id", sa.Text(), nullable=True),
        sa.Column("group_name", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "invite_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("invite_id", sa.Text(), nullable=True),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "ip_allowlist_event_configs",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("ip_allowlist_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id", "position"),
    )
    op.create_table(
        "ip_allowlist_event_ips",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("ip", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id", "position"),
    )
    op.create_table(
        "ip_allowlist_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("ip_allowlist_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "login_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "organization_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("organization_id", sa.Text(), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("threads_ui_visibility", sa.Text(), nullable=True),
        sa.Column("usage_dashboard_visibility", sa.Text(), nullable=True),
        sa.Column("api_call_logging", sa.Text(), nullable=True),
        sa.Column("api_call_logging_project_ids", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "project_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("project_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "rate_limit_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("rate_limit_id", sa.Text(), nullable=True),
        sa.Column("max_requests_per_1_minute", sa.BigInteger(), nullable=True),
        sa.Column("max_tokens_per_1_minute", sa.BigInteger(), nullable=True),
        sa.Column("max_images_per_1_minute", sa.BigInteger(), nullable=True),
        sa.Column("max_audio_megabytes_per_1_minute", sa.BigInteger(), nullable=True),
        sa.Column("max_requests_per_1_day", sa.BigInteger(), nullable=True),
        sa.Column("batch_1_day_max_input_tokens", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "role_assignment_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("role_assignment_id", sa.Text(), nullable=True),
        sa.Column("principal_id", sa.Text(), nullable=True),
        sa.Column("principal_type", sa.Text(), nullable=True),
        sa.Column("resource_id", sa.Text(), nullable=True),
        sa.Column("resource_type", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "role_binding_event_permissions",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("permission", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id", "position"),
    )
    op.create_table(
        "role_binding_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("bound_resource_id", sa.Text(), nullable=True),
        sa.Column("role_id", sa.Text(), nullable=True),
        sa.Column("resource_id", sa.Text(), nullable=True),
        sa.Column("resource_type", sa.Text(), nullable=True),
        sa.Column("workspace_id", sa.Text(), nullable=True),
        sa.Column("connector_id", sa.Text(), nullable=True),
        sa.Column("connector_name", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=True),
        sa.Column("source", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "role_event_permissions",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("permission", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id", "position"),
    )
    op.create_table(
        "role_event_permissions_added",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("permission", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id", "position"),
    )
    op.create_table(
        "role_event_permissions_removed",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("permission", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id", "position"),
    )
    op.create_table(
        "role_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("role_id", sa.Text(), nullable=True),
        sa.Column("role_name", sa.Text(), nullable=True),
        sa.Column("resource_type", sa.Text(), nullable=True),
        sa.Column("resource_id", sa.Text(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "metadata", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "scim_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("scim_id", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "service_account_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("service_account_id", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "user_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("role", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "workload_identity_provider_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("identity_provider_id", sa.Text(), nullable=True),
        sa.Column("name", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.Column(
            "changes_requested",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )
    op.create_table(
        "workload_identity_provider_mapping_events",
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("mapping_id", sa.Text(), nullable=True),
        sa.Column("identity_provider_id", sa.Text(), nullable=True),
        sa.Column("project_id", sa.Text(), nullable=True),
        sa.Column("service_account_id", sa.Text(), nullable=True),
        sa.Column("data", sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"), nullable=True),
        sa.Column(
            "changes_requested",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["audit_events.id"],
        ),
        sa.PrimaryKeyConstraint("event_id"),
    )


def downgrade() -> None:
    op.drop_table("workload_identity_provider_mapping_events")
    op.drop_table("workload_identity_provider_events")
    op.drop_table("user_events")
    op.drop_table("service_account_events")
    op.drop_table("scim_events")
    op.drop_table("role_events")
    op.drop_table("role_event_permissions_removed")
    op.drop_table("role_event_permissions_added")
    op.drop_table("role_event_permissions")
    op.drop_table("role_binding_events")
    op.drop_table("role_binding_event_permissions")
    op.drop_table("role_assignment_events")
    op.drop_table("rate_limit_events")
    op.drop_table("project_events")
    op.drop_table("organization_events")
    op.drop_table("login_events")
    op.drop_table("ip_allowlist_events")
    op.drop_table("ip_allowlist_event_ips")
    op.drop_table("ip_allowlist_event_configs")
    op.drop_table("invite_events")
    op.drop_table("group_events")
    op.drop_table("external_key_events")
    op.drop_table("checkpoint_permission_events")
    op.drop_table("certificate_events")
    op.drop_table("certificate_event_certificates")
    op.drop_table("api_key_events")
    op.drop_table("api_key_event_scopes")
