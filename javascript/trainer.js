// sd-webui-trainer: the Trainer tab's client side. Names are prefixed sd_trainer_ (all extensions share one page).

// _js of the Train and Resume buttons: put a fresh task id in the first input (a hidden textbox) and follow the
// task with the WebUI's progress bar (requestProgress, javascript/progressbar.js) above the output area; the
// progress text (step, epoch, loss) also goes to #sd_trainer_progress.
function sd_trainer_start() {
    var app = gradioApp();
    var id = randomId();
    var progressText = app.querySelector('#sd_trainer_progress');
    requestProgress(id, app.getElementById('sd_trainer_output'), null, function() {
        if (progressText) progressText.innerHTML = '';
    }, function(progress) {
        if (progressText) progressText.textContent = progress.textinfo || '';
    });
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}
