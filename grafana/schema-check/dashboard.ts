/**
 * What every file in grafana/dashboards must be: Grafana's own `Dashboard` type from
 * @grafana/schema, with each panel's options and custom field config held to the schema of
 * its visualization plugin and each query to Grafana's Prometheus query schema.
 * tests/test_grafana_dashboards.py type-checks every dashboard file against
 * `ProvisionedDashboard` with tsc, so an unknown key, a misspelt option or a wrong value
 * type fails the build instead of being silently dropped by Grafana.
 */
import type { Dashboard, FieldConfig, FieldConfigSource, Panel, RowPanel } from '@grafana/schema';
import type * as BarGauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as Stat from '@grafana/schema/dist/esm/raw/composable/stat/panelcfg/x/StatPanelCfg_types.gen';
import type * as StateTimeline from '@grafana/schema/dist/esm/raw/composable/statetimeline/panelcfg/x/StateTimelinePanelCfg_types.gen';
import type * as Table from '@grafana/schema/dist/esm/raw/composable/table/panelcfg/x/TablePanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';
import type { dataquery as PrometheusQuery } from '@grafana/grafana-foundation-sdk/prometheus';

/** JSON has no enums: where the schema names a string enum, the JSON holds its string. */
type Json<T> = T extends string
  ? `${T}`
  : T extends Array<infer Item>
    ? Array<Json<Item>>
    : T extends object
      ? { [Key in keyof T]: Json<T[Key]> }
      : T;

/** Every query and panel reads the provisioned Prometheus datasource. */
interface PrometheusRef {
  type: 'prometheus';
  uid: string;
}

type Target = Json<Omit<PrometheusQuery, '_implementsDataqueryVariant' | 'datasource'>> & {
  datasource?: PrometheusRef;
};

/** `Custom` is the plugin's own field config; `never` where the plugin has none. */
type PluginPanel<Type extends string, Options, Custom> = Omit<
  Json<Panel>,
  'type' | 'options' | 'fieldConfig' | 'targets' | 'datasource'
> & {
  type: Type;
  datasource: PrometheusRef;
  targets: Target[];
  options: Json<Options>;
  fieldConfig: {
    defaults: Omit<Json<FieldConfig>, 'custom'> & { custom?: Json<Custom> };
    overrides: Json<FieldConfigSource['overrides']>;
  };
};

type VisualizationPanel =
  | PluginPanel<'timeseries', TimeSeries.Options, TimeSeries.FieldConfig>
  | PluginPanel<'bargauge', BarGauge.Options, never>
  | PluginPanel<'stat', Stat.Options, never>
  | PluginPanel<'state-timeline', StateTimeline.Options, StateTimeline.FieldConfig>
  | PluginPanel<'table', Table.Options, Table.FieldConfig>;

type Row = Omit<Json<RowPanel>, 'panels'> & { panels: VisualizationPanel[] };

export type ProvisionedDashboard = Omit<Json<Dashboard>, 'panels'> & {
  uid: string;
  title: string;
  panels: Array<VisualizationPanel | Row>;
};
