package classify

import (
	"fmt"
	"strings"

	pg_query "github.com/pganalyze/pg_query_go/v6"
)

// sideEffects maps built-in (and common extension) functions that do
// more than compute a value to the rule they hit. They match whatever
// schema the call names: a same-named function elsewhere is treated as
// the built-in, which errs on the strict side.
var sideEffects = map[string]string{}

func init() {
	add := func(rule, list string) {
		ruleClass(rule) // a typo here is a bug: panic at start
		for _, f := range strings.Fields(list) {
			sideEffects[f] = rule
		}
	}
	add("func.sequence", "nextval setval")
	add("func.notify", "pg_notify pg_logical_emit_message")
	add("func.lo-write", "lo_create lo_creat lo_from_bytea lo_put lowrite")
	add("func.lo-unlink", "lo_unlink lo_truncate lo_truncate64")
	add("func.drop-slot", `pg_drop_replication_slot pg_logical_slot_get_changes pg_logical_slot_get_binary_changes
		pg_replication_slot_advance pg_replication_origin_drop`)
	add("func.server-control", `pg_terminate_backend pg_cancel_backend pg_reload_conf pg_rotate_logfile pg_promote
		pg_switch_wal pg_switch_xlog pg_create_restore_point pg_backup_start pg_backup_stop pg_start_backup pg_stop_backup
		pg_wal_replay_pause pg_wal_replay_resume pg_log_backend_memory_contexts pg_log_standby_snapshot
		pg_stat_reset pg_stat_reset_shared pg_stat_reset_single_table_counters pg_stat_reset_single_function_counters
		pg_stat_reset_slru pg_stat_reset_replication_slot pg_stat_reset_subscription_stats pg_stat_statements_reset
		pg_create_physical_replication_slot pg_create_logical_replication_slot pg_copy_physical_replication_slot
		pg_copy_logical_replication_slot pg_replication_origin_create pg_replication_origin_advance
		pg_replication_origin_session_setup pg_replication_origin_session_reset pg_replication_origin_xact_setup
		pg_import_system_collations pg_sync_replication_slots binary_upgrade_set_next_pg_type_oid`)
	add("func.server-files", `pg_read_file pg_read_binary_file pg_ls_dir pg_stat_file pg_ls_logdir pg_ls_waldir
		pg_ls_tmpdir pg_ls_archive_statusdir pg_ls_logicalsnapdir pg_ls_logicalmapdir pg_ls_replslotdir pg_ls_summariesdir
		pg_file_write pg_file_rename pg_file_unlink pg_file_sync pg_logdir_ls pg_file_read pg_file_length
		lo_import lo_export`)
	add("func.dblink", `dblink dblink_exec dblink_connect dblink_connect_u dblink_open dblink_fetch dblink_close
		dblink_send_query dblink_get_result dblink_build_sql_insert dblink_build_sql_update dblink_build_sql_delete`)
	add("func.set-config", "set_config")
	for f := range sqlStringArg {
		sideEffects[f] = "func.sql-string"
	}
}

// sqlStringArg lists functions that run SQL passed to them as text, and
// which argument holds it.
var sqlStringArg = map[string]int{
	"query_to_xml": 0, "query_to_xmlschema": 0, "query_to_xml_and_xmlschema": 0,
	"ts_stat": 0, "ts_rewrite": 1,
}

// builtins are pg_catalog functions that only compute a value (or touch
// nothing but this session). Called unqualified or as pg_catalog.f they
// are read; anything else goes to Options.Lookup.
var builtins = map[string]bool{}

func init() {
	for _, f := range strings.Fields(`
		count sum avg min max string_agg array_agg json_agg jsonb_agg json_object_agg jsonb_object_agg
		json_agg_strict jsonb_agg_strict json_object_agg_strict jsonb_object_agg_strict json_object_agg_unique jsonb_object_agg_unique
		bool_and bool_or every bit_and bit_or bit_xor stddev stddev_pop stddev_samp variance var_pop var_samp
		corr covar_pop covar_samp regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope regr_sxx regr_sxy regr_syy
		percentile_cont percentile_disc mode range_agg range_intersect_agg xmlagg any_value
		row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
		abs ceil ceiling floor round trunc sqrt cbrt power pow exp ln log log10 mod sign pi degrees radians
		sin cos tan cot asin acos atan atan2 sind cosd tand cotd asind acosd atand atan2d sinh cosh tanh asinh acosh atanh
		random random_normal div gcd lcm width_bucket factorial scale min_scale trim_scale erf erfc
		lower upper length char_length character_length octet_length bit_length substr substring trim btrim ltrim rtrim
		lpad rpad replace concat concat_ws left right reverse repeat split_part strpos position initcap format
		md5 sha224 sha256 sha384 sha512 crc32 crc32c encode decode convert convert_from convert_to
		regexp_replace regexp_matches regexp_match regexp_split_to_array regexp_split_to_table regexp_count
		regexp_instr regexp_like regexp_substr translate ascii chr quote_ident quote_literal quote_nullable to_hex
		starts_with string_to_array string_to_table array_to_string unistr normalize is_normalized overlay
		similar_escape similar_to_escape like_escape to_ascii casefold get_byte set_byte get_bit set_bit bit_count
		now clock_timestamp statement_timestamp transaction_timestamp timeofday date_trunc date_part extract age
		to_char to_date to_timestamp to_number make_date make_time make_timestamp make_timestamptz make_interval
		date_bin date_add date_subtract justify_days justify_hours justify_interval isfinite timezone overlaps
		generate_series generate_subscripts
		json_build_object jsonb_build_object json_build_array jsonb_build_array to_json to_jsonb
		jsonb_set jsonb_set_lax jsonb_insert jsonb_path_query jsonb_path_exists jsonb_path_match
		jsonb_path_query_array jsonb_path_query_first jsonb_path_query_tz jsonb_path_exists_tz jsonb_path_match_tz
		jsonb_path_query_array_tz jsonb_path_query_first_tz
		json_extract_path json_extract_path_text jsonb_extract_path jsonb_extract_path_text
		json_array_elements json_array_elements_text jsonb_array_elements jsonb_array_elements_text
		json_each json_each_text jsonb_each jsonb_each_text json_object_keys jsonb_object_keys
		json_array_length jsonb_array_length jsonb_pretty jsonb_strip_nulls json_strip_nulls json_typeof jsonb_typeof
		row_to_json array_to_json json_populate_record jsonb_populate_record json_populate_recordset jsonb_populate_recordset
		json_to_record jsonb_to_record json_to_recordset jsonb_to_recordset jsonb_object json_object jsonb_concat
		jsonb_contains jsonb_exists jsonb_exists_any jsonb_exists_all
		array_length array_upper array_lower cardinality unnest array_append array_prepend array_cat array_remove
		array_replace array_position array_positions array_dims array_ndims array_fill trim_array array_sample
		array_shuffle array_reverse array_sort
		pg_typeof format_type current_database current_schema current_schemas version current_setting
		pg_backend_pid inet_client_addr inet_client_port inet_server_addr inet_server_port
		has_table_privilege has_column_privilege has_schema_privilege has_database_privilege has_function_privilege
		has_sequence_privilege has_any_column_privilege has_type_privilege has_language_privilege has_tablespace_privilege
		has_foreign_data_wrapper_privilege has_server_privilege has_parameter_privilege pg_has_role row_security_active
		pg_get_viewdef pg_get_functiondef pg_get_function_arguments pg_get_function_result pg_get_function_identity_arguments
		pg_get_indexdef pg_get_constraintdef pg_get_triggerdef pg_get_ruledef pg_get_expr pg_get_userbyid
		pg_get_serial_sequence pg_get_keywords pg_get_statisticsobjdef pg_get_partkeydef pg_get_partition_constraintdef
		pg_table_size pg_total_relation_size pg_relation_size pg_indexes_size pg_database_size pg_tablespace_size
		pg_size_pretty pg_size_bytes pg_column_size pg_column_compression pg_relation_filenode pg_relation_filepath
		obj_description col_description shobj_description pg_describe_object pg_identify_object pg_identify_object_as_address
		pg_postmaster_start_time pg_conf_load_time pg_is_in_recovery pg_is_wal_replay_paused pg_get_wal_replay_pause_state
		pg_current_wal_lsn pg_current_wal_insert_lsn pg_current_wal_flush_lsn pg_last_wal_receive_lsn pg_last_wal_replay_lsn
		pg_wal_lsn_diff pg_walfile_name pg_walfile_name_offset pg_last_xact_replay_timestamp pg_last_committed_xact
		pg_xact_commit_timestamp pg_xact_status pg_current_snapshot pg_snapshot_xmin pg_snapshot_xmax pg_visible_in_snapshot
		txid_current txid_current_if_assigned txid_current_snapshot txid_snapshot_xmin txid_snapshot_xmax txid_status
		pg_current_xact_id pg_current_xact_id_if_assigned pg_blocking_pids pg_safe_snapshot_blocking_pids
		pg_trigger_depth pg_jit_available pg_notification_queue_usage pg_listening_channels pg_my_temp_schema
		pg_is_other_temp_schema pg_table_is_visible pg_type_is_visible pg_function_is_visible
		to_regclass to_regtype to_regproc to_regprocedure to_regnamespace to_regrole to_regoper to_regcollation to_regtypemod
		pg_input_is_valid pg_input_error_info num_nulls num_nonnulls pg_options_to_table pg_get_object_address
		pg_stat_get_activity pg_stat_get_backend_pid pg_stat_get_numscans pg_control_checkpoint pg_control_system
		pg_control_init pg_control_recovery pg_tablespace_location pg_tablespace_databases pg_settings_get_flags
		pg_sleep pg_sleep_for pg_sleep_until
		pg_advisory_lock pg_advisory_lock_shared pg_advisory_unlock pg_advisory_unlock_shared pg_advisory_unlock_all
		pg_advisory_xact_lock pg_advisory_xact_lock_shared pg_try_advisory_lock pg_try_advisory_lock_shared
		pg_try_advisory_xact_lock pg_try_advisory_xact_lock_shared
		currval lastval pg_sequence_last_value
		lo_get loread lo_open lo_close lo_lseek lo_lseek64 lo_tell lo_tell64
		to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank ts_rank_cd ts_headline
		setweight strip numnode querytree tsvector_to_array array_to_tsvector ts_lexize ts_debug ts_parse ts_token_type
		ts_delete ts_filter json_to_tsvector jsonb_to_tsvector tsquery_phrase get_current_ts_config
		gen_random_uuid uuidv4 uuidv7 uuid_extract_version uuid_extract_timestamp
		host hostmask masklen netmask network broadcast abbrev family set_masklen inet_same_family inet_merge
		text_host macaddr8_set7bit
		isempty lower_inc upper_inc lower_inf upper_inf range_merge multirange
		enum_first enum_last enum_range
		xpath xpath_exists xml_is_well_formed xml_is_well_formed_document xml_is_well_formed_content xmlcomment xmltext
		table_to_xml table_to_xmlschema table_to_xml_and_xmlschema cursor_to_xml cursor_to_xmlschema
		schema_to_xml database_to_xml
		coalesce nullif greatest least
		date time timestamp timestamptz interval text varchar bpchar char name int int2 int4 int8 float4 float8
		numeric bool boolean oid regclass regtype regproc json jsonb uuid inet cidr macaddr bytea money point
		box circle line lseg path polygon tsvector tsquery bit varbit daterange int4range int8range numrange
		tsrange tstzrange
		area center diameter height width radius npoints isclosed isopen pclose popen bound_box
		pg_collation_for pg_collation_actual_version pg_encoding_to_char pg_char_to_encoding
		array_agg_finalfn grouping
		pg_get_catalog_foreign_keys pg_get_publication_tables pg_get_replica_identity_index
		pg_partition_tree pg_partition_ancestors pg_partition_root pg_index_column_has_property
		pg_index_has_property pg_indexam_has_property pg_get_backend_memory_contexts pg_get_shmem_allocations
		pg_stat_get_wal pg_stat_get_io pg_stat_get_archiver pg_stat_get_bgwriter_stat_reset_time`) {
		builtins[f] = true
	}
	for f := range sideEffects {
		if builtins[f] {
			panic("classify: " + f + " is both a built-in without side effects and one with")
		}
	}
}

// funcName splits a call's name: "pg_catalog.lower" → ("pg_catalog", "lower").
func funcName(parts []*pg_query.Node) (schema, name string) {
	var s []string
	for _, p := range parts {
		s = append(s, strVal(p))
	}
	switch len(s) {
	case 0:
		return "", ""
	case 1:
		return "", s[0]
	}
	return s[len(s)-2], s[len(s)-1]
}

// funcCall classifies one function call found anywhere in a statement.
func (c *classifier) funcCall(v *verdict, f *pg_query.FuncCall, depth int) {
	schema, name := funcName(f.Funcname)
	qual := name
	if schema != "" {
		qual = schema + "." + name
	}
	if rule, ok := sideEffects[name]; ok {
		v.effects = true
		switch rule {
		case "func.sql-string":
			c.sqlString(v, f, qual, depth)
		case "func.set-config":
			c.setConfig(v, f)
		default:
			v.hit(rule, fmt.Sprintf("calls %s: %s", qual, ruleDesc(rule)))
		}
		return
	}
	if builtins[name] && (schema == "" || schema == "pg_catalog") {
		return // func.builtin: reads only
	}
	if c.opts.Lookup == nil {
		v.effects = true
		v.hit("func.unknown", fmt.Sprintf("calls %s: not a known built-in, and no catalog lookup to tell what it does", qual))
		return
	}
	vol, found := c.opts.Lookup(schema, name)
	v.effects = v.effects || !found || (vol != 'i' && vol != 's')
	switch {
	case !found:
		v.hit("func.unknown", fmt.Sprintf("calls %s: not a known built-in, and the catalog has no such function", qual))
	case vol == 'v':
		v.hit("func.volatile", fmt.Sprintf("calls %s: a volatile function may change data", qual))
	case vol == 'i' || vol == 's':
		// Immutable and stable functions cannot change the database.
	default:
		v.hit("func.unknown", fmt.Sprintf("calls %s: the catalog reports volatility %q", qual, vol))
	}
}

func ruleDesc(id string) string {
	d := ruleByID[id].Desc
	if i := strings.Index(d, ": "); i >= 0 {
		return d[i+2:]
	}
	return d
}

// sqlString classifies the SQL a function such as query_to_xml runs: as
// that SQL when it is a constant, else unknown.
func (c *classifier) sqlString(v *verdict, f *pg_query.FuncCall, qual string, depth int) {
	_, name := funcName(f.Funcname)
	i := sqlStringArg[name]
	if i < len(f.Args) {
		if s, ok := c.constString(f.Args[i]); ok {
			c.nestedText(v, s, "calls "+qual+", which runs: ", "func.sql-string", depth)
			return
		}
	}
	v.hit("func.sql-string", fmt.Sprintf("calls %s with SQL built at run time", qual))
}

// setConfig classifies set_config(name, value, local) like SET name.
func (c *classifier) setConfig(v *verdict, f *pg_query.FuncCall) {
	if len(f.Args) == 0 {
		v.hit("func.set-config", "calls set_config without a setting name")
		return
	}
	name, ok := c.constString(f.Args[0])
	if !ok {
		v.hit("func.set-config", "calls set_config with a setting name built at run time")
		return
	}
	var vals []*pg_query.Node
	if len(f.Args) > 1 {
		vals = f.Args[1:2]
	}
	c.setting(v, strings.ToLower(name), vals, "set_config('"+name+"')")
}

// constString returns a string constant, looking through casts.
func (c *classifier) constString(n *pg_query.Node) (string, bool) {
	switch x := inner(n).(type) {
	case *pg_query.A_Const:
		c.constRead = true
		if s := x.GetSval(); s != nil {
			return s.Sval, true
		}
	case *pg_query.TypeCast:
		return c.constString(x.Arg)
	}
	return "", false
}
