// A charging station written on ocpp-rpc, an OCPP-J implementation independent of the gateway's,
// in strict mode: every CALL and CALLRESULT in either direction is checked against the OCPP JSON
// schemas, and a message that fails them fails this station.
//
//   node station.js --endpoint ws://127.0.0.1:9000 --id STATION --password SECRET
//                   --protocol ocpp1.6|ocpp2.0.1 [--id-tag TAG] [--charge-seconds 6]
//                   [--meter-interval 1] [--max-current 16] [--phases 3]
//                   [--energy-wh N --departure-seconds S]   (2.0.1: NotifyEVChargingNeeds)
//
// It boots, authorizes, starts a transaction, sends meter values while its vehicle draws what the
// latest charging profile allows, stops, and prints one JSON object per line for each step, each
// profile received and a final summary. It exits 1 on any error, so the test sees it.
'use strict';
const { RPCClient } = require('ocpp-rpc');

function options(argv) {
    const opts = {
        idTag: 'TAG-NODE', chargeSeconds: 6, meterInterval: 1, maxCurrent: 16, phases: 3,
        energyWh: null, departureSeconds: null,
    };
    for (let i = 2; i < argv.length; i += 2) {
        const name = argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
        const value = argv[i + 1];
        opts[name] = /^-?[0-9.]+$/.test(value) && !['id', 'password', 'idTag'].includes(name) ? Number(value) : value;
    }
    for (const required of ['endpoint', 'id', 'password', 'protocol']) {
        if (opts[required] === undefined) throw new Error(`--${required} is required`);
    }
    return opts;
}

const say = (event, fields) => process.stdout.write(JSON.stringify({ event, ...fields }) + '\n');
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const now = () => new Date().toISOString();
const VOLTS = 230;

async function main() {
    const opts = options(process.argv);
    const v16 = opts.protocol === 'ocpp1.6';
    const client = new RPCClient({
        endpoint: opts.endpoint, identity: opts.id, password: opts.password,
        protocols: [opts.protocol], strictMode: true, reconnect: false, callTimeoutMs: 10000,
    });
    // What the vehicle may draw, per phase: the lowest of the station's maximum, a station-wide
    // max profile, and the transaction's profile (or, before one, the default profile), as a
    // station's composite schedule is.
    const limits = { station: Infinity, default: Infinity, tx: null };
    const currentAmps = () => Math.min(opts.maxCurrent, limits.station, limits.tx ?? limits.default);
    let limitAmps = currentAmps();
    let profiles = 0;
    let transactionId = v16 ? null : `tx-${opts.id}-${Date.now()}`;

    const firstPeriod = (schedule) => schedule.chargingSchedulePeriod[0];
    client.handle('SetChargingProfile', ({ params }) => {
        const profile = v16 ? params.csChargingProfiles : params.chargingProfile;
        const schedule = v16 ? profile.chargingSchedule : profile.chargingSchedule[0];
        const period = firstPeriod(schedule);
        const amps = schedule.chargingRateUnit === 'A'
            ? period.limit : period.limit / (VOLTS * (period.numberPhases || 3));
        const purpose = profile.chargingProfilePurpose;
        if (purpose === 'TxProfile') limits.tx = amps;
        else if (purpose === 'TxDefaultProfile') limits.default = amps;
        else limits.station = amps;
        limitAmps = currentAmps();
        profiles += 1;
        say('profile', {
            purpose: profile.chargingProfilePurpose, unit: schedule.chargingRateUnit,
            limit: period.limit, numberPhases: period.numberPhases ?? null,
            transactionId: profile.transactionId ?? null,
        });
        return { status: 'Accepted' };
    });
    client.handle('ClearChargingProfile', () => ({ status: 'Accepted' }));
    client.handle('GetCompositeSchedule', ({ params }) => {
        const schedule = {
            chargingRateUnit: 'A', duration: params.duration,
            chargingSchedulePeriod: [{ startPeriod: 0, limit: limitAmps, numberPhases: opts.phases }],
        };
        return v16
            ? { status: 'Accepted', connectorId: params.connectorId, scheduleStart: now(), chargingSchedule: schedule }
            : { status: 'Accepted', schedule: { evseId: params.evseId, duration: params.duration, scheduleStart: now(),
                chargingRateUnit: 'A', chargingSchedulePeriod: schedule.chargingSchedulePeriod } };
    });
    client.handle('GetTransactionStatus', () => ({ messagesInQueue: false, ongoingIndicator: transactionId !== null }));

    await client.connect();
    say('connected', { protocol: client.protocol });

    const boot = v16
        ? await client.call('BootNotification', { chargePointVendor: 'ocpp-rpc', chargePointModel: 'node-station' })
        : await client.call('BootNotification', { reason: 'PowerUp', chargingStation: { vendorName: 'ocpp-rpc', model: 'node-station' } });
    say('boot', { status: boot.status, interval: boot.interval });
    if (boot.status !== 'Accepted') throw new Error(`BootNotification was answered ${boot.status}`);
    await client.call('Heartbeat', {});
    if (v16) {
        await client.call('StatusNotification', { connectorId: 1, errorCode: 'NoError', status: 'Available' });
    } else {
        await client.call('StatusNotification', { timestamp: now(), connectorStatus: 'Available', evseId: 1, connectorId: 1 });
    }
    const authorize = v16
        ? await client.call('Authorize', { idTag: opts.idTag })
        : await client.call('Authorize', { idToken: { idToken: opts.idTag, type: 'ISO14443' } });
    const authorized = v16 ? authorize.idTagInfo.status : authorize.idTokenInfo.status;
    say('authorize', { status: authorized });

    let energyWh = 0;
    let seqNo = 0;
    const meterValue = (power) => [{
        timestamp: now(),
        sampledValue: v16
            ? [{ measurand: 'Power.Active.Import', unit: 'W', value: power.toFixed(1) },
               { measurand: 'Energy.Active.Import.Register', unit: 'Wh', value: energyWh.toFixed(1) }]
            : [{ measurand: 'Power.Active.Import', value: Number(power.toFixed(1)) },
               { measurand: 'Energy.Active.Import.Register', value: Number(energyWh.toFixed(1)) }],
    }];

    if (v16) {
        const started = await client.call('StartTransaction', { connectorId: 1, idTag: opts.idTag, meterStart: 0, timestamp: now() });
        transactionId = started.transactionId;
        say('started', { transactionId, status: started.idTagInfo.status });
        await client.call('StatusNotification', { connectorId: 1, errorCode: 'NoError', status: 'Charging' });
    } else {
        const started = await client.call('TransactionEvent', {
            eventType: 'Started', timestamp: now(), triggerReason: 'Authorized', seqNo: seqNo++,
            transactionInfo: { transactionId, chargingState: 'Charging' },
            evse: { id: 1, connectorId: 1 }, idToken: { idToken: opts.idTag, type: 'ISO14443' },
            meterValue: meterValue(0),
        });
        say('started', { transactionId, status: started.idTokenInfo ? started.idTokenInfo.status : null });
        if (opts.energyWh !== null) {
            const needs = await client.call('NotifyEVChargingNeeds', {
                evseId: 1,
                chargingNeeds: {
                    requestedEnergyTransfer: opts.phases === 1 ? 'AC_single_phase' : 'AC_three_phase',
                    departureTime: new Date(Date.now() + opts.departureSeconds * 1000).toISOString(),
                    acChargingParameters: { energyAmount: opts.energyWh, evMinCurrent: 6, evMaxCurrent: opts.maxCurrent, evMaxVoltage: VOLTS },
                },
            });
            say('charging_needs', { status: needs.status });
        }
    }

    const ticks = Math.max(1, Math.round(opts.chargeSeconds / opts.meterInterval));
    for (let tick = 0; tick < ticks; tick += 1) {
        await sleep(opts.meterInterval * 1000);
        // Below 6 A a vehicle does not charge (IEC 61851).
        const power = limitAmps >= 6 ? limitAmps * VOLTS * opts.phases : 0;
        energyWh += power * opts.meterInterval / 3600;
        if (v16) {
            await client.call('MeterValues', { connectorId: 1, transactionId, meterValue: meterValue(power) });
        } else {
            await client.call('TransactionEvent', {
                eventType: 'Updated', timestamp: now(), triggerReason: 'MeterValuePeriodic', seqNo: seqNo++,
                transactionInfo: { transactionId, chargingState: 'Charging' }, meterValue: meterValue(power),
            });
        }
        say('meter', { power_w: Math.round(power), energy_wh: Math.round(energyWh), limit_a: limitAmps });
    }

    if (v16) {
        const stopped = await client.call('StopTransaction', { transactionId, meterStop: Math.round(energyWh), timestamp: now(), reason: 'EVDisconnected' });
        say('stopped', { status: stopped.idTagInfo ? stopped.idTagInfo.status : null });
        await client.call('StatusNotification', { connectorId: 1, errorCode: 'NoError', status: 'Available' });
    } else {
        await client.call('TransactionEvent', {
            eventType: 'Ended', timestamp: now(), triggerReason: 'EVCommunicationLost', seqNo: seqNo++,
            transactionInfo: { transactionId, chargingState: 'Idle', stoppedReason: 'EVDisconnected' },
            meterValue: meterValue(0),
        });
        say('stopped', {});
        await client.call('StatusNotification', { timestamp: now(), connectorStatus: 'Available', evseId: 1, connectorId: 1 });
    }
    transactionId = null;
    await client.close({ code: 1000 });
    say('done', { profiles, energy_wh: Math.round(energyWh) });
}

main().catch((error) => {
    say('error', { message: String(error && error.message || error), details: error && error.details || null });
    process.exit(1);
});
